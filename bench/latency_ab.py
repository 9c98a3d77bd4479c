"""Round-trip latency of two revisions of the server, alternating: a change measured on a machine
whose speed drifts.

Each round starts a fresh `twinkle serve` (tiny-qwen3, local engine, SQLite) from each source tree
in turn and times, through the unmodified tinker SDK, a no-op `optim_step` and a 4-token `forward`
(`--calls` each after 5 warm-up). The other revision is a `git worktree add` of it; the server is
started with the tree as its working directory, so it imports that tree's code with this venv's
packages. Prints p50/p95 per round and tree; writes JSON and a PNG under bench/results/
(latency_ab.*).

    git worktree add /tmp/before 9f59f12
    .venv/bin/python bench/latency_ab.py /tmp/before . [--rounds 3] [--calls 150]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import outputs  # noqa: E402 - bench/outputs.py, beside this script
from op_latency import percentile  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from server.process import running_server  # noqa: E402


def timed(op: Callable[[], object], calls: int) -> dict[str, float]:
    for _ in range(5):
        op()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        op()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(statistics.median(times), 2), "p95_ms": round(percentile(times, 0.95), 2)}


def one_server(tree: Path, calls: int) -> dict[str, dict[str, float]]:
    import tinker
    from tinker import types

    here = Path.cwd()
    os.chdir(tree)  # the server process inherits it: `python -m server.cli` imports the tree's code
    try:
        with tempfile.TemporaryDirectory(prefix="twinkle-ab-") as tmp, \
                running_server(Path(tmp), extra_args=["--log-level", "warning"]) as server, \
                tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench") as service:
            tc = service.create_lora_training_client("tiny-qwen3", rank=8, seed=0).result()
            adam = types.AdamParams(learning_rate=1e-4)
            four = [types.Datum(model_input=types.ModelInput.from_ints([5, 6, 7, 8]),
                                loss_fn_inputs={"target_tokens": [6, 7, 8, 9], "weights": np.ones(4, np.float32)})]
            return {"optim_step (no-op)": timed(lambda: tc.optim_step(adam).result(), calls),
                    "forward 1 x 4": timed(lambda: tc.forward(four, "cross_entropy").result(), calls)}
    finally:
        os.chdir(here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=150)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    rounds = []
    for number in range(1, args.rounds + 1):
        rounds.append({name: one_server(tree, args.calls) for name, tree in trees.items()})
        print(f"round {number}: {rounds[-1]}", flush=True)
    report(rounds, {"trees": {k: str(v) for k, v in trees.items()}, "calls": args.calls})


def report(rounds: list[dict], settings: dict) -> None:
    ops = list(rounds[0]["before"])
    table = Table(title="p50 (p95) ms through the SDK, before -> after, a fresh server each, alternating")
    table.add_column("round", justify="right")
    for op in ops:
        table.add_column(op, justify="right")
        table.add_column("ratio", justify="right")
    for number, r in enumerate(rounds, 1):
        cells = []
        for op in ops:
            b, a = r["before"][op], r["after"][op]
            cells += [f"{b['p50_ms']:.2f} ({b['p95_ms']:.1f}) -> {a['p50_ms']:.2f} ({a['p95_ms']:.1f})",
                      f"{a['p50_ms'] / b['p50_ms']:.2f}"]
        table.add_row(str(number), *cells)
    Console().print(table)
    fig, ax = outputs.figure()
    for op in ops:
        for name, style in (("before", "--"), ("after", "-")):
            ax.plot(range(1, len(rounds) + 1), [r[name][op]["p50_ms"] for r in rounds], style, marker="o",
                    label=f"{op}, {name}")
    outputs.label_axes(ax, xlabel="round", ylabel="p50 ms", title="round-trip latency, before and after")
    outputs.save("latency_ab", {"settings": settings, "rounds": rounds}, fig)


if __name__ == "__main__":
    main()
