"""Many tenants on one base model: aggregate training throughput, packed vs one model per call.

Against a `twinkle serve` process (tiny-qwen3, local engine, SQLite), N tenants (1, 2, 4, 8, 16),
each with its own unmodified tinker SDK client and LoRA adapter (rank 8), step at once: each step a
forward_backward of B x S tokens (cross_entropy) and an optim_step. The server runs once with
packing on (TWINKLE_PACKING=auto: the scheduler gathers ready forward_backward calls of several
models into one engine call and the trainer packs them by its rule, docs/packing.md) and once with
it off (never: one model per engine call, as before), the two in alternating rounds. Reported per
shape and tenant count: aggregate trained tokens/s and each tenant's median step time, and the
ratio packed / one-by-one.

Prints a table; writes JSON and a PNG under bench/results/ (tenant_scaling.*).

    .venv/bin/python bench/tenant_scaling.py [--steps 6] [--tenants 1,2,4,8,16] [--shapes 2x64,8x128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import outputs  # noqa: E402 - bench/outputs.py, beside this script
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from server.process import running_server  # noqa: E402
from workers.base_models import TINY_QWEN3  # noqa: E402

MODES = ("auto", "never")  # TWINKLE_PACKING: packed, one model per call


def datums(types, batch: int, seq: int, seed: int) -> list:  # noqa: ANN001 - tinker's types module
    tokens = np.random.default_rng(seed).integers(3, 4000, size=(batch, seq + 1))
    return [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:].tolist(), "weights": np.ones(seq, np.float32)})
            for t in tokens]


class Tenants:
    """N SDK clients on one server, each its own tenant (API key) and adapter."""

    def __init__(self, base_url: str, n: int) -> None:
        import tinker
        from tinker import types

        self.types = types
        self.services = [tinker.ServiceClient(base_url=base_url, api_key=f"tml-bench-{i}") for i in range(n)]
        self.clients = [s.create_lora_training_client(TINY_QWEN3, rank=8, seed=i).result()
                        for i, s in enumerate(self.services)]

    def run(self, batch: int, seq: int, steps: int) -> tuple[float, list[float]]:
        """All tenants step `steps` times at once: (wall seconds, every step's seconds)."""
        adam = self.types.AdamParams(learning_rate=1e-4)
        step_times: list[float] = []
        lock, barrier = threading.Lock(), threading.Barrier(len(self.clients) + 1)

        def tenant(i: int) -> None:
            data = datums(self.types, batch, seq, i)
            barrier.wait()
            for _ in range(steps):
                start = time.perf_counter()
                fwd = self.clients[i].forward_backward(data, "cross_entropy")
                opt = self.clients[i].optim_step(adam)
                fwd.result(), opt.result()
                with lock:
                    step_times.append(time.perf_counter() - start)

        threads = [threading.Thread(target=tenant, args=(i,)) for i in range(len(self.clients))]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start, step_times

    def close(self) -> None:
        for service in self.services:
            service.close("success").result()


def measure(args: argparse.Namespace, data_dir: Path) -> list[dict]:
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    counts = [int(n) for n in args.tenants.split(",")]
    results: dict[tuple, dict[str, list]] = {}
    servers = {}
    try:
        for mode in MODES:  # both servers up at once, used in turn: never both computing
            env = {"TWINKLE_PACKING": mode}
            servers[mode] = running_server(data_dir / mode, extra_args=["--torch-threads", "2", "--log-level",
                                                                        "warning"], env=env)
        urls = {mode: ctx.__enter__().base_url for mode, ctx in servers.items()}
        for n in counts:
            fleets = {mode: Tenants(urls[mode], n) for mode in MODES}
            for batch, seq in shapes:
                for fleet in fleets.values():  # warm-up
                    fleet.run(batch, seq, 1)
                for rnd in range(args.rounds):
                    for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
                        wall, steps = fleets[mode].run(batch, seq, args.steps)
                        entry = results.setdefault((n, batch, seq), {m: [] for m in MODES})
                        entry[mode].append((wall, steps))
                print_progress(n, batch, seq, results[(n, batch, seq)], args.steps)
            for fleet in fleets.values():
                fleet.close()
    finally:
        for ctx in servers.values():
            ctx.__exit__(None, None, None)
    return [row(n, batch, seq, runs, args.steps) for (n, batch, seq), runs in results.items()]


def row(n: int, batch: int, seq: int, runs: dict[str, list], steps: int) -> dict:
    out: dict = {"tenants": n, "batch": batch, "seq": seq}
    for mode, label in (("auto", "packed"), ("never", "one_by_one")):
        walls = [wall for wall, _ in runs[mode]]
        out[f"{label}_tokens_per_s"] = n * steps * batch * seq / statistics.median(walls)
        out[f"{label}_step_ms"] = statistics.median([t for _, times in runs[mode] for t in times]) * 1e3
    out["ratio"] = out["packed_tokens_per_s"] / out["one_by_one_tokens_per_s"]
    return out


def print_progress(n: int, batch: int, seq: int, runs: dict[str, list], steps: int) -> None:
    r = row(n, batch, seq, runs, steps)
    print(f"{n} tenants x ({batch} x {seq}): packed {r['packed_tokens_per_s']:.0f} tok/s, one by one "
          f"{r['one_by_one_tokens_per_s']:.0f} tok/s, ratio {r['ratio']:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps per tenant per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per mode")
    parser.add_argument("--tenants", default="1,2,4,8,16")
    parser.add_argument("--shapes", default="2x64,8x128", help="B x S per forward_backward, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-") as tmp:
        rows = measure(args, Path(tmp))
    setting = {"base_model": TINY_QWEN3, "engine": "local, 2 torch threads", "machine":
               f"{platform.machine()}, {os.cpu_count()} CPUs", "steps": args.steps, "rounds": args.rounds}
    report(rows, setting)


def report(rows: list[dict], setting: dict) -> None:
    table = Table(title="tenants stepping at once: aggregate tokens/s and step time, packed vs one model per call")
    for column in ("tenants", "B x S", "packed tok/s", "one-by-one tok/s", "ratio", "packed step ms",
                   "one-by-one step ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["tenants"]), f"{r['batch']} x {r['seq']}", f"{r['packed_tokens_per_s']:.0f}",
                      f"{r['one_by_one_tokens_per_s']:.0f}", f"{r['ratio']:.2f}", f"{r['packed_step_ms']:.0f}",
                      f"{r['one_by_one_step_ms']:.0f}")
    console = Console()
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in setting.items()))
    fig, ax = outputs.figure()
    for batch, seq in sorted({(r["batch"], r["seq"]) for r in rows}):
        mine = [r for r in rows if (r["batch"], r["seq"]) == (batch, seq)]
        for key, style in (("packed_tokens_per_s", "-"), ("one_by_one_tokens_per_s", "--")):
            ax.plot([r["tenants"] for r in mine], [r[key] for r in mine], style, marker="o",
                    label=f"{batch} x {seq}, {'packed' if key.startswith('packed') else 'one by one'}")
    outputs.label_axes(ax, xlabel="tenants stepping at once", ylabel="aggregate tokens/s", log2_x=True,
                       title=f"multi-tenant scaling, {setting['base_model']}")
    outputs.save("tenant_scaling", {"setting": setting, "rows": rows}, fig)


if __name__ == "__main__":
    main()
