"""Per-operation latency through the unmodified tinker SDK: what one call costs, end to end.

Against a `twinkle serve` process (tiny-qwen3, local engine, SQLite), one SDK training client
(LoRA rank 8) times each operation, one at a time, `--reps` times after a warm-up, and reports
p50 and p95 in milliseconds:

  optim_step (no-op)   an optimizer step with no gradients: the round trip and nothing else
  forward 4            forward of one 4-token datum
  forward_backward     at 2 x 64, 8 x 128 and 8 x 1024 tokens
  optim_step (after)   a real step, after a forward_backward
  sample 8             8 tokens from a 4-token prompt

Prints a table, writes JSON and a PNG under bench/results/ (op_latency.*).

    .venv/bin/python bench/op_latency.py [--reps 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import outputs  # noqa: E402 - bench/outputs.py, beside this script

from server.process import running_server  # noqa: E402
from workers.base_models import TINY_QWEN3  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def datums(types, batch: int, seq: int) -> list:  # noqa: ANN001 - tinker's types module
    tokens = np.random.default_rng(batch * seq).integers(3, 4000, size=(batch, seq + 1))
    return [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:].tolist(), "weights": np.ones(seq, np.float32)})
            for t in tokens]


def operations(tc, sampler, types) -> dict[str, Callable[[], object]]:  # noqa: ANN001
    adam = types.AdamParams(learning_rate=1e-4)
    four, small, medium, large = (datums(types, b, s) for b, s in ((1, 4), (2, 64), (8, 128), (8, 1024)))
    prompt, params = types.ModelInput.from_ints([5, 6, 7, 8]), types.SamplingParams(max_tokens=8, temperature=0.0)

    def then_step(data: list) -> Callable[[], object]:
        return lambda: (tc.forward_backward(data, "cross_entropy").result(), tc.optim_step(adam).result())

    return {
        "optim_step (no-op)": lambda: tc.optim_step(adam).result(),
        "forward 1 x 4": lambda: tc.forward(four, "cross_entropy").result(),
        "forward_backward 2 x 64": lambda: tc.forward_backward(small, "cross_entropy").result(),
        "forward_backward 8 x 128": lambda: tc.forward_backward(medium, "cross_entropy").result(),
        "forward_backward 8 x 1024": lambda: tc.forward_backward(large, "cross_entropy").result(),
        "fwd_bwd + optim_step 8 x 128": then_step(medium),
        "sample 8 tokens": lambda: sampler.sample(prompt, 1, params).result(),
    }


def measure(base_url: str, reps: int, warmup: int) -> dict[str, list[float]]:
    import tinker
    from tinker import types

    times: dict[str, list[float]] = {}
    with tinker.ServiceClient(base_url=base_url, api_key="tml-bench") as sc:
        tc = sc.create_lora_training_client(TINY_QWEN3, rank=8, seed=0).result()
        sampler = tc.save_weights_and_get_sampling_client().result()
        for name, op in operations(tc, sampler, types).items():
            n = max(5, reps // 5) if "1024" in name else reps
            for _ in range(warmup):
                op()
            times[name] = []
            for _ in range(n):
                start = time.perf_counter()
                op()
                times[name].append((time.perf_counter() - start) * 1000)
    return times


def report(times: dict[str, list[float]], settings: dict) -> dict:
    from rich.console import Console
    from rich.table import Table

    rows = {name: {"p50_ms": round(statistics.median(t), 2), "p95_ms": round(percentile(t, 0.95), 2), "n": len(t)}
            for name, t in times.items()}
    table = Table(title="per-op latency through the tinker SDK (ms)")
    for column in ("operation", "p50", "p95", "n"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    for name, row in rows.items():
        table.add_row(name, f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}", str(row["n"]))
    console = Console()
    console.print(table)
    console.print(f"settings: {settings}")
    return rows


def save(rows: dict, settings: dict) -> tuple[Path, Path]:
    names = list(rows)
    fig, ax = outputs.figure()
    ax.barh(names, [rows[n]["p50_ms"] for n in names], label="p50")
    ax.scatter([rows[n]["p95_ms"] for n in names], names, color="black", marker="|", s=200, label="p95")
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (log scale)")
    ax.invert_yaxis()
    ax.legend()
    ax.set_title("per-op latency through the tinker SDK, tiny-qwen3, local engine")
    return outputs.save("op_latency", {"rows": rows, "settings": settings}, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2, help="the server's compute threads")
    args = parser.parse_args()
    settings = {"base_model": TINY_QWEN3, "rank": 8, "engine": "local", "database": "sqlite",
                "torch_threads": args.torch_threads,
                "cpus": os.cpu_count(), "python": platform.python_version(), "reps": args.reps}
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-") as tmp, \
            running_server(Path(tmp), extra_args=["--torch-threads", str(args.torch_threads), "--log-level",
                                                  "warning"]) as server:
        times = measure(server.base_url, args.reps, args.warmup)
    rows = report(times, settings)
    save(rows, settings)


if __name__ == "__main__":
    main()
