"""What paging adapters in and out of the LoRA pool costs.

Five tenants (LoRA ranks 1, 4, 8, 16, 32) take turns, one forward_backward + optim_step each per
turn, in-process, on one trainer per way:
- every adapter resident (no limit);
- two slots, paged-out adapters held in host memory;
- two slots, every paged-out adapter spilled to disk (host budget 0);
- the last two again without shells (`max_shells=0`): every page-in rebuilds the peft modules,
  as before shells existed.
With two slots and five tenants in turn, every step pages one adapter in and another out, the
worst case. The ways take turns round by round, so drift on a noisy machine hits all alike. Also
times one page-out and one page-in of the rank-32 adapter (weights, AdamW moments and pending
gradients) directly. Prints tables; ratios are to the all-resident median of the same run.

    .venv/bin/python bench/pool_paging.py [--rounds 6] [--base-model tiny-qwen3] [--batch 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas.wire import DatumIn  # noqa: E402
from workers.base_models import TINY_QWEN3, resolve_base_model  # noqa: E402
from workers.losses import get_loss  # noqa: E402
from workers.trainer import LoraTrainer, load_base_model  # noqa: E402
from workers.types import AdamConfig, BaseModelInfo, LoraSpec  # noqa: E402

RANKS = (1, 4, 8, 16, 32)
ADAM = AdamConfig(learning_rate=1e-4)
CE = get_loss("cross_entropy")


def make_data(vocab: int, batch: int, seq: int, seed: int) -> list[DatumIn]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq + 1))
    return [DatumIn(tokens=t[:-1], loss_fn_inputs={"target_tokens": t[1:], "weights": np.ones(seq, np.float32)})
            for t in tokens]


def new_trainer(model_dir: Path, **pool) -> LoraTrainer:
    base = load_base_model(model_dir)
    info = BaseModelInfo(model_dir.name, type(base).__name__, base.config.vocab_size, 4096)
    trainer = LoraTrainer(base, info, **pool)
    for rank in RANKS:
        trainer.create_adapter(f"r{rank}", LoraSpec(rank=rank, seed=rank))
    return trainer


def step(trainer: LoraTrainer, name: str, data: list[DatumIn]) -> float:
    start = time.perf_counter()
    trainer.forward_backward(name, data, CE, {})
    trainer.optim_step(name, ADAM)
    return time.perf_counter() - start


def one_round(trainer: LoraTrainer, data: list[DatumIn]) -> list[float]:
    return [step(trainer, f"r{rank}", data) for rank in RANKS]


def page_costs(trainer: LoraTrainer, data: list[DatumIn], repeats: int) -> tuple[list[float], list[float]]:
    """Time paging the rank-32 adapter out, then back in (activating it pages it in), after a step."""
    outs, ins = [], []
    for _ in range(repeats):
        step(trainer, "r32", data)  # pending state to carry: moments now, gradients below
        trainer.forward_backward("r32", data, CE, {})
        start = time.perf_counter()
        trainer.page_out("r32")
        outs.append(time.perf_counter() - start)
        start = time.perf_counter()
        with trainer.using("r32"):
            ins.append(time.perf_counter() - start)
        trainer.optim_step("r32", ADAM)
    return outs, ins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (one step per tenant each)")
    parser.add_argument("--base-model", default=TINY_QWEN3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-pool-") as tmp:
        model_dir = resolve_base_model(args.base_model, Path(tmp), allow_download=False)
        ways = {
            "all resident": {},
            "2 slots, host memory": {"max_resident": 2},
            "2 slots, disk": {"max_resident": 2, "host_budget_bytes": 0, "spill_dir": Path(tmp) / "spill-disk"},
            # Without shells every page-in rebuilds the adapter's peft modules.
            "2 slots, host memory, no shells": {"max_resident": 2, "max_shells": 0},
            "2 slots, disk, no shells": {"max_resident": 2, "max_shells": 0, "host_budget_bytes": 0,
                                         "spill_dir": Path(tmp) / "spill-disk-ns"},
        }
        trainers = {way: new_trainer(model_dir, **pool) for way, pool in ways.items()}
        data = make_data(trainers["all resident"].info.vocab_size, args.batch, args.seq, seed=0)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for trainer in trainers.values():
            one_round(trainer, data)  # warm-up, not timed
        for _ in range(args.rounds):
            for way, trainer in trainers.items():
                times[way] += one_round(trainer, data)
        rows = [(way, times[way], trainer.pool_status()) for way, trainer in trainers.items()]
        pages = {way: page_costs(trainer, data, repeats=5) for way, trainer in trainers.items() if way != "all resident"}
    report(args, rows, pages)


def report(args: argparse.Namespace, rows: list, pages: dict) -> None:
    title = f"5 tenants (ranks {RANKS}) in turn, {args.base_model}, batch {args.batch}x{args.seq}"
    table = Table(title=title)
    for column in ("way", "steps", "median step ms", "ratio", "page-ins", "page-outs", "spills"):
        table.add_column(column, justify="right")
    baseline = statistics.median(rows[0][1])
    for way, times, status in rows:
        median = statistics.median(times)
        table.add_row(way, str(len(times)), f"{median * 1e3:.1f}", f"{median / baseline:.2f}",
                      str(status.page_ins), str(status.page_outs), str(status.spills))
    costs = Table(title="rank-32 adapter with moments and gradients: one page-out, one page-in (median of 5)")
    for column in ("way", "page-out ms", "page-in ms"):
        costs.add_column(column, justify="right")
    for way, (outs, ins) in pages.items():
        costs.add_row(way, f"{statistics.median(outs) * 1e3:.1f}", f"{statistics.median(ins) * 1e3:.1f}")
    console = Console(width=120)
    console.print(table)
    console.print(costs)


if __name__ == "__main__":
    main()
