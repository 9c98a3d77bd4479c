"""Commands that ask a running server over HTTP, as a client would: `twinkle status` and
`twinkle checkpoints download`. The server is --url (env TWINKLE_URL, else TINKER_BASE_URL, else
http://127.0.0.1:8000), the key --api-key (env TWINKLE_API_KEY, else TINKER_API_KEY)."""

from __future__ import annotations

import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from server.commands.output import one_line, print_json, size, stdout_console, transfer

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1"
TWINKLE_API = "/twinkle/v1"
TIMEOUT = httpx.Timeout(30.0, connect=3.0)


class CommandFailed(Exception):
    """What went wrong, said for the user (no traceback); the command exits 1."""


def server_url(given: str | None) -> str:
    url = given or os.environ.get("TWINKLE_URL") or os.environ.get("TINKER_BASE_URL") or DEFAULT_URL
    return url.rstrip("/")


def api_key(given: str | None) -> str | None:
    return given or os.environ.get("TWINKLE_API_KEY") or os.environ.get("TINKER_API_KEY") or None


def _client(url: str, key: str | None) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT, follow_redirects=False)


def _get(client: httpx.Client, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.get(path, **kwargs)
    except httpx.TransportError as exc:
        raise CommandFailed(
            f"no server answers at {client.base_url} ({one_line(exc, 200)}): start one with `twinkle serve`, or pass "
            "--url (env TWINKLE_URL)"
        ) from None


def _refusal(response: httpx.Response, what: str) -> CommandFailed:
    """A non-2xx answer, said plainly: what was asked, the status, the server's own message."""
    try:
        body = response.json()
        message = body.get("detail") or body.get("message") or body.get("error") or body
        if isinstance(message, dict):
            message = message.get("message") or message
    except ValueError:
        message = response.text[:200]
    hint = ""
    if response.status_code == 401:
        hint = ": the server does not accept this API key (with --auth keys, make one: `twinkle keys create --tenant NAME`)"
    return CommandFailed(f"{what}: HTTP {response.status_code}: {message}{hint}")


# ----- twinkle status ----------------------------------------------------------------------------
def _healthy(response: httpx.Response) -> bool:
    """A Twinkle server's answer to GET /api/v1/healthz."""
    return response.status_code == 200 and _json(response).get("status") == "ok"


def is_twinkle(url: str, timeout: float = 2.0) -> bool:
    """Whether a Twinkle server answers at `url` (False for another program, or none)."""
    try:
        with _client(url, None) as client:
            return _healthy(client.get(f"{API}/healthz", timeout=timeout))
    except (httpx.HTTPError, httpx.InvalidURL):
        return False


def status(url: str, key: str | None, *, as_json: bool) -> int:
    with _client(url, key) as client:
        health = _get(client, f"{API}/healthz")
        if not _healthy(health):
            raise CommandFailed(f"something answers at {url}, but not as a Twinkle server "
                                f"(GET {API}/healthz: HTTP {health.status_code}); check --url")
        if key is None:
            if as_json:
                print_json({"url": url, "status": "ok"})
            else:
                print(f"Twinkle at {url}: up")
            print("twinkle: pass --api-key (or set TWINKLE_API_KEY / TINKER_API_KEY) to see its capacity and "
                  "your usage", file=sys.stderr)
            return 0
        response = _get(client, f"{TWINKLE_API}/status")
        if response.status_code != 200:
            raise _refusal(response, f"GET {TWINKLE_API}/status")
        state = response.json()
        runs = _get(client, f"{API}/training_runs", params={"limit": 0})
        if runs.status_code == 200:
            state["training_runs"] = (_json(runs).get("cursor") or {}).get("total_count")
    if as_json:
        print_json({"url": url, **state})
    else:
        _print_status(url, state)
    return 0


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {s:02d}s"


def _print_status(url: str, state: dict[str, Any]) -> None:
    from rich.table import Table

    console = stdout_console()
    capacity = state.get("capacity") or {}
    bases = state.get("base_models") or [state.get("base_model")]
    console.print(f"[bold]Twinkle[/] at {url}: [green]{state.get('status')}[/], up {_uptime(state.get('uptime_seconds', 0))}, "
                  f"base model{'s' if len(bases) > 1 else ''} {', '.join(map(str, bases))}")

    pools = capacity.get("pools") or {}
    # One column per base model (there are few): the table fits a terminal of 80 columns.
    table = Table(title="Adapters per base model", title_justify="left")
    table.add_column("")
    for name in bases:
        table.add_column(str(name), justify="right")

    def row(label: str, cell: Any) -> None:
        table.add_row(label, *(cell(pools[n]) if n in pools else "-" for n in bases))

    row("resident", lambda p: f"{p['resident_adapters']} of "
        + ("no limit" if p.get("max_resident_adapters") is None else str(p["max_resident_adapters"])))
    row("pinned by samplers", lambda p: str(p["pinned_adapters"]))
    row("paged out to host memory", lambda p: f"{p['paged_in_host']} ({size(p['host_bytes'])})")
    row("paged out to disk", lambda p: str(p["paged_on_disk"]))
    row("page ins / outs", lambda p: f"{p['page_ins']} / {p['page_outs']}")
    console.print(table)
    if not pools:
        console.print("[dim](no adapter has run yet: pools appear once a base model has run something)[/]")

    usage = capacity.get("tenant") or {}
    limits = usage.get("limits") or {}
    table = Table(title="Queues, and this API key's tenant", title_justify="left")
    table.add_column("")
    table.add_column("now", justify="right")
    table.add_column("limit", justify="right")
    table.add_row("samples queued (all tenants)", str(capacity.get("samples_pending", "-")),
                  str(capacity.get("sample_queue_limit", "-")))
    table.add_row("queue depth", str(usage.get("queue_depth", "-")), "")
    table.add_row("requests in flight", str(usage.get("inflight_requests", "-")),
                  _limit(limits.get("max_inflight_requests")))
    table.add_row("live training runs", str(usage.get("live_models", "-")), _limit(limits.get("max_live_models")))
    if state.get("training_runs") is not None:
        table.add_row("training runs (all kept)", str(state["training_runs"]), "")
    table.add_row("adapter versions in memory", f"{usage.get('adapter_versions', 0)} "
                  f"({size(usage.get('adapter_version_bytes', 0))})", "")
    console.print(table)


def _limit(value: Any) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


# ----- twinkle checkpoints download --------------------------------------------------------------
def download(url: str, key: str | None, tinker_path: str, output: Path | None, extract: Path | None,
             *, progress: bool) -> int:
    from server import ids
    from server.errors import InvalidRequest

    try:
        path = ids.parse_tinker_path(tinker_path)
    except InvalidRequest as exc:
        raise CommandFailed(exc.message) from None
    if key is None:
        raise CommandFailed("an API key is needed to download a checkpoint: --api-key, or set TWINKLE_API_KEY / "
                            "TINKER_API_KEY (the checkpoint's owner's, unless it is published)")
    segment = ids.KIND_TO_SEGMENT[path.kind]
    route = (f"{API}/training_runs/{quote(path.model_id, safe='')}/checkpoints/{quote(segment, safe='')}/"
             f"{quote(path.name, safe='')}/archive")
    with _client(url, key) as client:
        # A 302 to a signed link of the tar, which also carries the link in its body.
        answer = _get(client, route)
        if answer.status_code not in (200, 302):
            raise _refusal(answer, f"checkpoint {tinker_path}")
        link = _json(answer).get("url") or answer.headers.get("location")
        if not link:
            raise CommandFailed(f"checkpoint {tinker_path}: the server gave no download link")
    target = output or Path(re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.model_id}_{segment}_{path.name}") + ".tar")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part")
    received = 0
    try:
        # The link is signed: it needs no API key, and the key is not sent along with it.
        with httpx.stream("GET", link, timeout=TIMEOUT) as response:
            if response.status_code != 200:
                response.read()
                raise _refusal(response, f"downloading {tinker_path}")
            total = int(response.headers.get("content-length") or 0) or None
            with transfer(progress, target.name, total) as advance, open(partial, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    advance(len(chunk))
        if total is not None and received != total:
            raise CommandFailed(f"downloading {tinker_path}: got {received} of {total} bytes; try again")
        try:
            with tarfile.open(partial) as tar:
                names = sorted(tar.getnames())
                if extract is not None:
                    extract.mkdir(parents=True, exist_ok=True)
                    tar.extractall(extract, filter="data")  # "data": nothing outside extract, no links out
        except tarfile.TarError as exc:
            raise CommandFailed(f"downloading {tinker_path}: not a valid archive ({exc})") from None
        os.replace(partial, target)
    except httpx.TransportError as exc:
        raise CommandFailed(f"downloading {tinker_path}: {one_line(exc, 200)}") from None
    finally:
        partial.unlink(missing_ok=True)
    answer_json: dict[str, Any] = {"path": tinker_path, "file": str(target), "bytes": received, "files": names}
    if extract is not None:
        answer_json["extracted_to"] = str(extract)
    print_json(answer_json)
    return 0
