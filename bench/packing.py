"""Packed or one adapter after another: the measurement behind workers/packing.py's rule.

In-process, with the trainer the engine uses (no server): N adapters (LoRA rank 8) each with one
forward_backward of B x S tokens (cross_entropy), run as one packed pass and as N passes one after
another, and -- the ceiling of any packing -- as one pass of every row on one adapter, in
alternating order, the torch threads chosen as the local engine chooses them (one for a pass of at
most SMALL_PASS_TOKENS tokens on a CPU). Prints a table of the median milliseconds and the ratios
per shape; writes JSON and a PNG under bench/results/ (packing.*).

    .venv/bin/python bench/packing.py [--reps 7] [--tenants 2,4,8,16] [--shapes 1x16,2x64,4x64,8x128]
                                      [--device cuda --dtype bfloat16 --base-model ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import outputs  # noqa: E402 - bench/outputs.py, beside this script
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas.wire import DatumIn  # noqa: E402
from server.engine.local import SMALL_PASS_TOKENS  # noqa: E402
from workers.base_models import TINY_QWEN3, resolve_base_model  # noqa: E402
from workers.losses import get_loss  # noqa: E402
from workers.packing import PackRule, Segment  # noqa: E402
from workers.trainer import LoraTrainer, load_base_model  # noqa: E402
from workers.types import BaseModelInfo, LoraSpec  # noqa: E402

TENANTS = (2, 4, 8, 16)
SHAPES = ((1, 16), (2, 64), (4, 64), (8, 128))
CE = get_loss("cross_entropy")


@contextmanager
def threads_for(tokens: int, device: torch.device, most: int):
    """The local engine's choice: one torch thread for a small CPU pass (server/engine/local.py)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1 if device.type == "cpu" and tokens <= SMALL_PASS_TOKENS else most)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def segments(n: int, batch: int, seq: int, vocab: int) -> list[Segment]:
    rng = np.random.default_rng(n * batch * seq)
    out = []
    for i in range(n):
        tokens = rng.integers(3, vocab, size=(batch, seq + 1))
        data = [DatumIn(tokens=t[:-1], loss_fn_inputs={"target_tokens": t[1:], "weights": np.ones(seq, np.float32)})
                for t in tokens]
        out.append(Segment(f"t{i}", [data], CE, {}))
    return out


def runners(trainer: LoraTrainer, segs: list[Segment], most: int) -> dict[str, Callable[[], None]]:
    device = trainer.device

    def packed() -> None:
        with threads_for(sum(sum(s.rows) for s in segs), device, most):
            outcome = trainer.forward_backward_packed(segs)
        assert not any(isinstance(o, Exception) for o in outcome), outcome

    def one_by_one() -> None:
        for seg in segs:
            with threads_for(sum(seg.rows), device, most):
                trainer.forward_backward_groups(seg.name, seg.groups, seg.loss, seg.config)

    # The ceiling of any packing: every row in one pass on one adapter, no routing at all.
    everything = [[datum for seg in segs for group in seg.groups for datum in group]]

    def one_adapter() -> None:
        with threads_for(sum(sum(s.rows) for s in segs), device, most):
            trainer.forward_backward_groups(segs[0].name, everything, segs[0].loss, segs[0].config)

    return {"packed": packed, "one_by_one": one_by_one, "one_adapter": one_adapter}


def timed(fn: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(trainer: LoraTrainer, reps: int, most: int, tenants: tuple[int, ...],
            shapes: tuple[tuple[int, int], ...]) -> list[dict]:
    rows = []
    for n in tenants:
        for batch, seq in shapes:
            segs = segments(n, batch, seq, trainer.info.vocab_size)
            fns = runners(trainer, segs, most)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for fn in fns.values():  # warm-up
                fn()
            for rep in range(reps):  # alternate which goes first: the machine's speed drifts
                order = list(fns) if rep % 2 == 0 else list(reversed(fns))
                for name in order:
                    times[name].append(timed(fns[name], trainer.device))
            for seg in segs:  # gradients would only grow; keep each rep's work the same
                for p in trainer._adapter(seg.name).params.values():
                    p.grad = None
            packed, alone, single = (statistics.median(times[k]) for k in ("packed", "one_by_one", "one_adapter"))
            rows.append({"tenants": n, "batch": batch, "seq": seq, "segment_tokens": batch * seq,
                         "packed_ms": packed * 1e3, "one_by_one_ms": alone * 1e3, "speedup": alone / packed,
                         "one_adapter_ms": single * 1e3, "ceiling": alone / single})
            print(f"{n} x ({batch} x {seq}): packed {packed * 1e3:.1f} ms, one by one {alone * 1e3:.1f} ms, "
                  f"one adapter with every row {single * 1e3:.1f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for a pass over 256 tokens")
    parser.add_argument("--tenants", default=",".join(map(str, TENANTS)))
    parser.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="B x S, comma-separated")
    parser.add_argument("--base-model", default=TINY_QWEN3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = resolve_base_model(args.base_model, Path(tmp), allow_download=False)
        run(args, model_dir)


def run(args: argparse.Namespace, model_dir: Path) -> None:
    base = load_base_model(model_dir, device=args.device or "cpu", dtype=getattr(torch, args.dtype or "float32"))
    info = BaseModelInfo(args.base_model, type(base).__name__, base.config.vocab_size, 4096)
    trainer = LoraTrainer(base, info, packing=PackRule(mode="always"), max_tokens_per_pass=1 << 16)
    tenants = tuple(int(n) for n in args.tenants.split(","))
    for i in range(max(tenants)):
        trainer.create_adapter(f"t{i}", LoraSpec(rank=8, seed=i))
    shapes = tuple(tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(","))
    rows = measure(trainer, args.reps, args.threads, tenants, shapes)
    setting = {"base_model": args.base_model, "device": str(trainer.device), "dtype": str(base.dtype),
               "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
               "reps": args.reps, "threads": args.threads}
    report(rows, setting)


def report(rows: list[dict], setting: dict) -> None:
    table = Table(title="packed vs one adapter after another (median ms per call; speedup = one-by-one / packed; "
                        "ceiling = one-by-one / every row on one adapter in one pass)")
    for column in ("tenants", "B x S", "tokens/segment", "packed ms", "one-by-one ms", "one adapter ms",
                   "speedup", "ceiling"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(str(r["tenants"]), f"{r['batch']} x {r['seq']}", str(r["segment_tokens"]),
                      f"{r['packed_ms']:.1f}", f"{r['one_by_one_ms']:.1f}", f"{r['one_adapter_ms']:.1f}",
                      f"{r['speedup']:.2f}", f"{r['ceiling']:.2f}")
    console = Console()
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in setting.items()))
    fig, ax = outputs.figure()
    for batch, seq in sorted({(r["batch"], r["seq"]) for r in rows}):
        mine = [r for r in rows if (r["batch"], r["seq"]) == (batch, seq)]
        ax.plot([r["tenants"] for r in mine], [r["speedup"] for r in mine], marker="o", label=f"{batch} x {seq}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    outputs.label_axes(ax, xlabel="adapters in the call", ylabel="speedup of packing", log2_x=True,
                       title=f"packed vs one-by-one, {setting['base_model']} on {setting['device']}")
    outputs.save("packing", {"setting": setting, "rows": rows}, fig)


if __name__ == "__main__":
    main()
