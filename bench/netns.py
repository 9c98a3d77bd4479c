"""Benchmarks that start Ray run inside a loopback-only network namespace, as the tests do: Ray
binds wildcard addresses unless only loopback exists."""

from __future__ import annotations

import os
import subprocess
import sys

NETNS_FLAG = "TWINKLE_IN_NETNS"


def in_loopback_namespace() -> None:
    """Re-run this script inside a new network namespace with only loopback up (unshare -n; root)."""
    if os.environ.get(NETNS_FLAG) == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        return
    env = {**os.environ, NETNS_FLAG: "1"}
    os.execvpe("unshare", ["unshare", "-n", sys.executable, *sys.argv], env)
