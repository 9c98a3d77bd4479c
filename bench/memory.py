"""How much memory one large forward_backward costs the server.

For each case, a fresh `twinkle serve` process (127.0.0.1, free port) and a client process that
drives it through the unmodified tinker SDK: a LoRA (rank 8) training client, one small warm-up
forward_backward (cross_entropy), then one forward_backward of the case's batch shape
(datums x tokens per datum). The server's RSS is read once the warm-up is done (baseline) and
sampled from /proc/<pid>/status every --interval seconds during the big call; its VmHWM is reset
(/proc/<pid>/clear_refs) at the baseline and read at the end, so a spike between two samples still
counts. Growth = peak - baseline; seconds = wall time of the big call (forward_backward() until
its result() returns, in the client).

Safety: if the server's RSS passes --cap-gb it is killed at once ("> cap (killed)"), and a case
that runs longer than --timeout seconds in all (start-up included) is stopped ("timeout").

The SDK splits a large forward_backward into several HTTP requests (at most 1024 datums and an
estimated 5 MB of protobuf each, unless the server's client config says otherwise); the
"requests" column is that split and "max req tokens" the largest request, which is what
max_tokens_per_request (default 2^20) and max_request_mb (default 256) are checked against.

Base models come from (and are converted once into) <data-dir>/models; every case gets a fresh
run folder (database, log) under <data-dir>/runs, removed afterwards unless --keep.
--source DIR runs the server from another checkout of this repo (e.g. a git worktree of an older
commit): `python -m server.cli serve` with cwd=DIR and PYTHONPATH=DIR, checked to import DIR's code.

    .venv/bin/python bench/memory.py [--case tiny-8x512 ...] [--source DIR] [--cap-gb 12]
        [--timeout 900] [--json PATH] [--data-dir .twinkle-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"Twinkle is ready at (http://\S+)")
RANK = 8
WARMUP = (2, 64)  # datums x tokens of the warm-up forward_backward
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tiny-qwen3"
GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    name: str
    base_model: str
    datums: int
    seq: int  # tokens per datum

    @property
    def tokens(self) -> int:
        return self.datums * self.seq


CASES = {c.name: c for c in (
    Case("tiny-8x512", TINY, 8, 512),
    Case("tiny-64x4096", TINY, 64, 4096),
    Case("tiny-256x4096", TINY, 256, 4096),
    Case("smollm2-8x2048", SMOLLM2, 8, 2048),
)}


@dataclass
class Row:
    case: str
    base_model: str
    datums: int
    seq: int
    tokens: int
    source: str
    outcome: str = "error"
    baseline_bytes: int | None = None
    peak_bytes: int | None = None  # max(sampled VmRSS, VmHWM since the baseline)
    growth_bytes: int | None = None
    sampled_peak_bytes: int | None = None
    hwm_bytes: int | None = None  # None: not readable (or the server was killed first)
    seconds: float | None = None  # wall time of the big forward_backward (killed: until the kill)
    requests: int | None = None  # HTTP requests the SDK split it into
    max_request_tokens: int | None = None
    max_request_est_bytes: int | None = None
    loss: float | None = None
    detail: str = ""
    cap_bytes: int = 0
    extra: dict = field(default_factory=dict)


# ----- the server's memory ---------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value, _unit = line.split()
                    out[key[:-1]] = int(value) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Monitor(threading.Thread):
    """Samples the server's RSS; kills it the moment it passes the cap."""

    def __init__(self, proc: subprocess.Popen, cap: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.cap, self.interval = proc, cap, interval
        self.peak = 0  # since start() or the last reset_peak()
        self.last = 0
        self.killed_at: int | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.is_set() and self.proc.poll() is None:
            rss = proc_status(self.proc.pid).get("VmRSS", 0)
            with self.lock:
                self.last = rss
                self.peak = max(self.peak, rss)
            if rss > self.cap:
                self.killed_at = rss
                self.proc.kill()
                return
            self.stop.wait(self.interval)

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = self.last


# ----- the server and the client processes -----------------------------------------------------
def source_env(source: Path | None) -> tuple[dict[str, str], Path]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TWINKLE_ALLOW_DOWNLOAD": "false"}
    cwd = REPO
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])
        cwd = source
    return env, cwd


def check_source(source: Path) -> None:
    env, cwd = source_env(source)
    code = "import gateway, schemas, server, workers; print(*(m.__file__ for m in (gateway, schemas, server, workers)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    files = out.stdout.split()
    wrong = [f for f in files if not Path(f).resolve().is_relative_to(source)]
    if wrong:
        sys.exit(f"--source {source}: these modules come from elsewhere: {wrong}")


def materialise(model: str, data_root: Path, source: Path | None) -> None:
    """Resolve (and, the first time, convert) the base model into data_root/models, outside any
    measured server, with the code that will serve it."""
    env, cwd = source_env(source)
    out = subprocess.run([sys.executable, "-m", "server.cli", "model-path", model, "--data-dir", str(data_root)],
                         cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"model-path {model} failed: {out.stderr.strip()[-2000:]}")


def start_server(model: str, data_dir: Path, source: Path | None, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    env, cwd = source_env(source)
    log_path = data_dir / "server.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
           "--base-model", model, "--data-dir", str(data_dir), *extra]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    return proc, log_path


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stdin):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def lines_of(stream, tag: str, q: queue.Queue) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            q.put((tag, line))
        q.put((tag, None))

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def run_case(case: Case, args: argparse.Namespace) -> Row:
    cap = int(args.cap_gb * GIB)
    row = Row(case.name, case.base_model, case.datums, case.seq, case.tokens,
              str(args.source or REPO), cap_bytes=cap)
    deadline = time.monotonic() + args.timeout
    materialise(case.base_model, args.data_dir, args.source)
    runs = args.data_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{case.name}-", dir=runs))
    (run_dir / "models").symlink_to((args.data_dir / "models").resolve(), target_is_directory=True)
    server, log_path = start_server(case.base_model, run_dir, args.source, args.server_arg)
    monitor = Monitor(server, cap, args.interval)
    monitor.start()
    client = None
    events: queue.Queue = queue.Queue()
    try:
        lines_of(server.stdout, "server", events)
        base_url = None
        client_done = False
        go_at = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                row.outcome = "timeout"
                break
            if monitor.killed_at is not None:
                row.outcome = "> cap (killed)"
                row.peak_bytes = row.sampled_peak_bytes = monitor.peak
                row.detail = f"RSS {monitor.killed_at / GIB:.2f} GiB > cap {args.cap_gb:g} GiB"
                if go_at is not None:  # how long the big call ran before it passed the cap
                    row.seconds = time.monotonic() - go_at
                    row.detail += f" after {row.seconds:.1f} s of the big forward_backward"
                break
            try:
                tag, line = events.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if tag == "server":
                if line is None:
                    if server.poll() is not None and monitor.killed_at is None:
                        time.sleep(0.2)  # the monitor may be about to report a kill
                        if monitor.killed_at is None:
                            row.detail = f"server exited with {server.returncode}: " + tail(log_path)
                            break
                    continue
                if base_url is None and (m := READY.search(line)):
                    base_url = m.group(1)
                    with open(run_dir / "client.log", "ab") as client_log:  # the SDK's retry chatter
                        client = subprocess.Popen(
                            [sys.executable, str(Path(__file__).resolve()), "_client", base_url, case.base_model,
                             str(case.datums), str(case.seq)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=client_log, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
                    lines_of(client.stdout, "client", events)
                continue
            if line is None:  # the client's stdout closed
                if not client_done:
                    client.wait()
                    row.detail = f"client exited with {client.returncode}: " + tail(run_dir / "client.log")
                    break
                continue
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg["event"] == "warm":
                time.sleep(args.settle)
                row.baseline_bytes = proc_status(server.pid).get("VmRSS")
                hwm_ok = reset_hwm(server.pid)
                monitor.reset_peak()
                go_at = time.monotonic()
                try:
                    client.stdin.write("go\n")
                    client.stdin.flush()
                except OSError:
                    pass  # the client is gone: its stdout closing reports it
                row.extra["hwm_reset"] = hwm_ok
            elif msg["event"] == "split":
                row.requests = msg["requests"]
                row.max_request_tokens = msg["max_tokens"]
                row.max_request_est_bytes = msg["max_est_bytes"]
            elif msg["event"] == "done":
                client_done = True
                row.seconds = msg["seconds"]
                row.loss = msg.get("loss")
                status = proc_status(server.pid)
                time.sleep(args.interval)
                row.sampled_peak_bytes = monitor.peak
                if row.extra.get("hwm_reset"):
                    row.hwm_bytes = status.get("VmHWM")
                row.peak_bytes = max(filter(None, [row.sampled_peak_bytes, row.hwm_bytes]))
                row.outcome = "ok"
                break
            elif msg["event"] == "error":
                client_done = True
                row.detail = msg["error"]
                row.seconds = msg.get("seconds")
                row.sampled_peak_bytes = row.peak_bytes = monitor.peak
                break
    finally:
        monitor.stop.set()
        if client is not None:
            client.kill()
            client.wait()
            stop(client, 0)
        stop(server)
        monitor.join(timeout=5)
        if row.outcome != "ok" and not row.detail and row.outcome != "> cap (killed)":
            row.detail = tail(log_path)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    if row.peak_bytes is not None and row.baseline_bytes is not None:
        row.growth_bytes = row.peak_bytes - row.baseline_bytes
    return row


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


# ----- the client (a separate process, so a killed server cannot leave it hanging here) ---------
def client_main(base_url: str, model: str, datums: int, seq: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import tinker
    from tinker import types

    def say(**msg) -> None:
        print(json.dumps(msg), flush=True)

    def batch(n: int, length: int, seed: int) -> list:
        tokens = np.random.default_rng(seed).integers(3, 4000, size=(n, length + 1))
        return [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                            loss_fn_inputs={"target_tokens": t[1:].astype(np.int64),
                                            "weights": np.ones(length, dtype=np.float32)})
                for t in tokens]

    service = tinker.ServiceClient(base_url=base_url, api_key="tml-bench-memory")
    training = service.create_lora_training_client(model, rank=RANK, seed=0).result()
    data = batch(datums, seq, 0)
    try:
        split = list(training._chunked_requests_generator(data))  # what the SDK will send
        say(event="split", requests=len(split), max_tokens=max(sum(d.model_input.length for d in c.data) for c in split),
            max_est_bytes=max(c.estimated_bytes_count for c in split))
    except Exception:  # a private SDK helper: the split is informative only
        pass
    training.forward_backward(batch(*WARMUP, 1), "cross_entropy").result()
    say(event="warm")
    sys.stdin.readline()
    start = time.perf_counter()
    try:
        result = training.forward_backward(data, "cross_entropy").result()
    except Exception as exc:  # noqa: BLE001
        say(event="error", error=f"{type(exc).__name__}: {exc}"[:2000], seconds=time.perf_counter() - start)
    else:
        say(event="done", seconds=time.perf_counter() - start, loss=result.metrics.get("loss:sum"))
    sys.stdout.flush()
    os._exit(0)  # the SDK's background threads need not be waited for


# ----- report ----------------------------------------------------------------------------------
def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def report(rows: list[Row], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    src = str(args.source) if args.source else f"{REPO} (this checkout)"
    table = Table(title=f"server RSS for one forward_backward (cross_entropy, LoRA rank {RANK}); server code: {src}")
    for column in ("case", "tokens", "requests", "baseline GiB", "peak GiB", "growth GiB", "seconds", "outcome"):
        table.add_column(column, justify="left" if column in ("case", "outcome") else "right")
    for r in rows:
        shape = f"{r.datums} x {r.seq} = {r.tokens:,}"
        reqs = "-" if r.requests is None else f"{r.requests} (max {r.max_request_tokens:,} tok)"
        table.add_row(r.case, shape, reqs, gib(r.baseline_bytes),
                      ("> " if r.outcome.startswith(">") else "") + gib(r.peak_bytes),
                      ("> " if r.outcome.startswith(">") else "") + gib(r.growth_bytes),
                      "-" if r.seconds is None else f"{r.seconds:.1f}" + (" (killed)" if r.outcome.startswith(">") else ""),
                      r.outcome)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(f"cap {args.cap_gb:g} GiB, timeout {args.timeout:g} s, RSS sampled every {args.interval * 1e3:.0f} ms"
                  f" (peak also from VmHWM); load average {os.getloadavg()[0]:.2f}")
    for r in rows:
        if r.detail:
            console.print(f"[bold]{r.case}[/bold]: {r.detail}", markup=True, highlight=False)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        _, _, url, model, datums, seq = sys.argv
        client_main(url, model, int(datums), int(seq))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=list(CASES),
                        help="run this case (repeat for several; default: all)")
    parser.add_argument("--source", type=Path, help="run the server from this checkout of the repo")
    parser.add_argument("--cap-gb", type=float, default=12.0, help="kill the server past this RSS (GiB)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case, start-up included")
    parser.add_argument("--interval", type=float, default=0.05, help="RSS sampling period, seconds")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds between the warm-up and the baseline")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".twinkle-bench",
                        help="persistent folder: models/ (converted once) and runs/")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra `twinkle serve` argument (repeat; e.g. --server-arg=--torch-threads=2)")
    parser.add_argument("--keep", action="store_true", help="keep each case's run folder (server log, database)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.data_dir = args.data_dir.resolve()
    if args.source is not None:
        args.source = args.source.resolve()
        check_source(args.source)
    if not any(a.startswith("--log-level") for a in args.server_arg):
        args.server_arg.append("--log-level=warning")
    rows = []
    for name in args.case or list(CASES):
        case = CASES[name]
        print(f"{name}: {case.datums} x {case.seq} tokens on {case.base_model} ...", file=sys.stderr, flush=True)
        row = run_case(case, args)
        print(f"{name}: {row.outcome}, peak {gib(row.peak_bytes)} GiB, growth {gib(row.growth_bytes)} GiB",
              file=sys.stderr, flush=True)
        rows.append(row)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    report(rows, args)


if __name__ == "__main__":
    main()
