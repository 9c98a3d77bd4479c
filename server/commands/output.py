"""What the commands print, in one place: JSON and plain tables on stdout for scripts, rich tables
for people, progress bars on stderr (only on a terminal, or when asked), secrets masked in URLs, errors
on one line."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # rich is imported when something is drawn: `twinkle serve` never pays for it
    from rich.console import Console
    from rich.progress import Progress


def print_json(value: Any) -> None:
    from pydantic_core import to_json

    print(to_json(value).decode())


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Aligned plain columns: what `tenants list` and `keys list` print (easy to grep and cut)."""
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def when(at: Any) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%SZ") if at is not None else "-"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def one_line(error: object, limit: int = 300) -> str:
    """An error's message on one line (drivers write several), cut to `limit` characters; its type's
    name when it has no message."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def stdout_console() -> Console:
    from rich.console import Console

    # soft_wrap: a long line stays one line in a pipe (no wrapping at 80 columns).
    return Console(soft_wrap=True, highlight=False)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True, highlight=False)


def progress_wanted(flag: bool | None) -> bool:
    """--progress / --no-progress, else only when stderr is a terminal: never in a log or a pipe."""
    return sys.stderr.isatty() if flag is None else flag


def mask_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***, for messages and tables."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:  # unparsable (a bad port): mask whatever sits between ':' and '@'
        scheme, sep, rest = url.partition("://")
        creds, at, host = rest.rpartition("@")
        if not at or ":" not in creds:
            return url
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


class Steps:
    """A progress callback of (what, done, total) drawn as one bar on stderr; inert when disabled. The
    bar appears at the first report: work that turns out to be done already draws nothing."""

    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._task: Any = None

    def __call__(self, what: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(what, total=total)
        self._progress.update(self._task, description=what, completed=done, total=total)

    def close(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.stop()


@contextlib.contextmanager
def steps(enabled: bool) -> Iterator[Steps]:
    """For work in a few named steps (a model conversion, migrations): a bar with the step's name."""
    if not enabled:
        yield Steps(None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Steps(Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TimeElapsedColumn(), console=stderr_console(), redirect_stdout=False))
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def transfer(enabled: bool, what: str, total: int | None) -> Iterator[Any]:
    """For a download: yields advance(nbytes); bytes, speed and time left when the total is known."""
    if not enabled:
        yield lambda _n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=stderr_console(), redirect_stdout=False)
    with progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)
