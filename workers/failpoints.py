"""Named points where a crash test can make the process die (`kill -9` from inside) or pause.

A crash at a chosen instant cannot be timed from outside when the window is a millisecond wide
(between a checkpoint's files and its row, say), so the code names its windows and a test arms
one: `TWINKLE_FAILPOINTS="checkpoint.before_rename=kill"` (or `=sleep:2.5`; several separated by
commas). Unset — always, outside tests — `hit` is one dict lookup. The points:

  checkpoint.before_rename   the checkpoint's files are written under a temp name, not renamed
  checkpoint.before_record   the folder has its final name; its row is not committed yet
"""

from __future__ import annotations

import os
import signal
import time

ENV = "TWINKLE_FAILPOINTS"


def _parse(spec: str) -> dict[str, str]:
    points = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        if action != "kill" and not action.startswith("sleep:"):
            raise ValueError(f"{ENV}: {item!r}: the action is 'kill' or 'sleep:<seconds>'")
        points[name] = action
    return points


_ARMED = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Do what the point `name` is armed to do: nothing, unless a test armed it."""
    action = _ARMED.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: what a crash does
    time.sleep(float(action.removeprefix("sleep:")))
