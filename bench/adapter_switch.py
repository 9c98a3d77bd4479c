"""What switching the active adapter costs as adapters pile up in the model.

peft's `set_adapter` sets requires_grad on every adapter of every LoRA layer, so one switch costs
O(layers x adapters); LoraTrainer switches in O(layers) (workers/trainer.py, `_activate`). With N
rank-8 adapters in one model, times both ways of switching to each adapter in turn. Prints a table.

    .venv/bin/python bench/adapter_switch.py [--base-model tiny-qwen3] [--counts 1 8 32 64] [--repeats 20]
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

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from workers.base_models import TINY_QWEN3, resolve_base_model  # noqa: E402
from workers.trainer import LoraTrainer, load_base_model  # noqa: E402
from workers.types import BaseModelInfo, LoraSpec  # noqa: E402


def median_ms(switch: Callable[[str], None], names: list[str], repeats: int) -> float:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        switch(names[i % len(names)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default=TINY_QWEN3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-switch-") as tmp:
        model_dir = resolve_base_model(args.base_model, Path(tmp), allow_download=False)
        base = load_base_model(model_dir)
        trainer = LoraTrainer(base, BaseModelInfo(model_dir.name, type(base).__name__, base.config.vocab_size, 4096))
        table = Table(title=f"switching the active adapter, {args.base_model} (median of {args.repeats})")
        for column in ("adapters", "peft set_adapter ms", "twinkle switch ms", "ratio"):
            table.add_column(column, justify="right")
        names: list[str] = []
        for count in sorted(args.counts):
            while len(names) < count:
                names.append(f"a{len(names)}")
                trainer.create_adapter(names[-1], LoraSpec(rank=8, seed=len(names)))
            peft_ms = median_ms(trainer.model.set_adapter, names, args.repeats)
            ours_ms = median_ms(trainer._activate, names, args.repeats)
            table.add_row(str(count), f"{peft_ms:.2f}", f"{ours_ms:.3f}", f"{peft_ms / ours_ms:.0f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
