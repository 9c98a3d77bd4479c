"""What the Ray engine adds to a training step, over the local engine.

Starts two `twinkle serve` processes on the same base model (default tiny-qwen3, LoRA rank 8,
batch 8 x 128 tokens): one on the local engine, one on the Ray engine (a private Ray cluster:
trainer and sampler deployments). Times one forward_backward + optim_step through the unmodified
tinker SDK on each, in alternating blocks (never both at once), and prints a table and the ratio
of the medians (target: Ray / local <= 1.15).

Ray binds wildcard addresses unless only loopback exists, so the script runs itself inside a
loopback-only network namespace (unshare -n; root).

    .venv/bin/python bench/ray_overhead.py [--steps 30] [--block 5]
    # on a GPU machine
    .venv/bin/python bench/ray_overhead.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from netns import in_loopback_namespace  # noqa: E402 - bench/, this script's own folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per engine")
    parser.add_argument("--block", type=int, default=5, help="steps in a row on one engine")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--base-model", default="tiny-qwen3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    in_loopback_namespace()

    import numpy as np
    import tinker
    from rich.console import Console
    from rich.table import Table
    from tinker import types

    from server.process import running_server

    tokens = np.random.default_rng(0).integers(3, 4096, size=(args.batch, args.seq + 1))
    data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:].tolist(),
                                        "weights": np.ones(args.seq, dtype=np.float32)})
            for t in tokens]
    common: list[str] = []
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if value:
            common += [flag, value]
    times: dict[str, list[float]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-ray-") as tmp, ExitStack() as stack:
        clients = {}
        for engine in ("local", "ray"):
            server = stack.enter_context(running_server(
                Path(tmp) / engine, base_model=args.base_model, extra_args=[*common, "--engine", engine], timeout=600))
            service = stack.enter_context(tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench"))
            clients[engine] = service.create_lora_training_client(args.base_model, rank=8, seed=0).result()

        def step(engine: str) -> float:
            tc = clients[engine]
            started = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            fb.result()
            return time.perf_counter() - started

        for engine in times:
            for _ in range(args.warmup):
                step(engine)
        while len(times["ray"]) < args.steps:
            for engine in times:
                times[engine].extend(step(engine) for _ in range(args.block))

    table = Table(title=f"Step time, {args.base_model} rank 8, batch {args.batch} x {args.seq} "
                        f"({args.steps} steps each, blocks of {args.block})")
    for column in ("engine", "median ms", "p10 ms", "p90 ms"):
        table.add_column(column, justify="right")
    for engine, spent in times.items():
        deciles = statistics.quantiles(spent, n=10)
        table.add_row(engine, f"{statistics.median(spent) * 1e3:.1f}", f"{deciles[0] * 1e3:.1f}",
                      f"{deciles[-1] * 1e3:.1f}")
    console = Console(width=120)
    console.print(table)
    ratio = statistics.median(times["ray"]) / statistics.median(times["local"])
    console.print(f"ray / local median step time: {ratio:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
