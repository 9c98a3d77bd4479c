"""What the server adds to a training step.

Times one forward_backward + optim_step (default: tiny-qwen3, LoRA rank 8, batch 8 x 128 tokens)
two ways: through the unmodified tinker SDK over HTTP against a `twinkle serve` process, and the
same work done in-process with the same trainer code. The two run in alternating blocks, never at
the same time, each with 2 torch threads. Prints a table and the ratio of the medians (target:
<= 1.25); writes JSON and a PNG under bench/results/ (step_overhead-BxS.*).

    .venv/bin/python bench/step_overhead.py [--steps 30] [--block 5]
    # the GPU check: SmolLM2-135M at 8 x 1024 tokens in bfloat16 on CUDA
    .venv/bin/python bench/step_overhead.py --base-model HuggingFaceTB/SmolLM2-135M-Instruct \
        --batch 8 --seq 1024 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import outputs  # noqa: E402 - bench/outputs.py, beside this script
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from schemas.wire import DatumIn  # noqa: E402
from server.process import running_server  # noqa: E402
from workers.base_models import TINY_QWEN3, resolve_base_model  # noqa: E402
from workers.losses import get_loss  # noqa: E402
from workers.trainer import LoraTrainer, load_base_model  # noqa: E402
from workers.types import AdamConfig, BaseModelInfo, LoraSpec  # noqa: E402

RANK, LR = 8, 1e-4
BATCH, SEQ = 8, 128  # set from the command line


def batch() -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(0).integers(3, 4096, size=(BATCH, SEQ + 1))
    return tokens, np.ones((BATCH, SEQ), dtype=np.float32)


class SdkStep:
    def __init__(self, base_url: str, base_model: str) -> None:
        import tinker
        from tinker import types

        self.types = types
        self.service = tinker.ServiceClient(base_url=base_url, api_key="tml-bench")
        self.client = self.service.create_lora_training_client(base_model, rank=RANK, seed=0).result()
        tokens, weights = batch()
        self.data = [
            types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:].tolist(), "weights": w})
            for t, w in zip(tokens, weights)
        ]

    def __call__(self) -> float:
        fb = self.client.forward_backward(self.data, "cross_entropy")
        opt = self.client.optim_step(self.types.AdamParams(learning_rate=LR))
        loss = fb.result().metrics["loss:sum"]
        opt.result()
        return loss

    def close(self) -> None:
        self.service.close("success").result()


class InProcessStep:
    def __init__(self, model_dir: Path, name: str, device: str | None, dtype: str | None) -> None:
        base = load_base_model(model_dir, device=device or "cpu", dtype=getattr(torch, dtype or "float32"))
        info = BaseModelInfo(name, type(base).__name__, base.config.vocab_size, 4096)
        self.trainer = LoraTrainer(base, info)
        self.trainer.create_adapter("bench", LoraSpec(rank=RANK, seed=0))
        tokens, weights = batch()
        self.data = [DatumIn(tokens=t[:-1], loss_fn_inputs={"target_tokens": t[1:], "weights": w})
                     for t, w in zip(tokens, weights)]
        self.loss = get_loss("cross_entropy")

    def __call__(self) -> float:
        with torch_threads(2):
            result = self.trainer.forward_backward("bench", self.data, self.loss, {})
            self.trainer.optim_step("bench", AdamConfig(learning_rate=LR))
        return result.metrics["loss:sum"]


class torch_threads:
    """The bench process idles on one thread while the server works; it takes two for its own turn."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def timed(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    global BATCH, SEQ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="measured steps per way")
    parser.add_argument("--block", type=int, default=5, help="steps per alternating block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--base-model", default=TINY_QWEN3)
    parser.add_argument("--batch", type=int, default=BATCH, help="datums per step")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per datum")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: the server's default; cpu in-process)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    BATCH, SEQ = args.batch, args.seq
    torch.set_num_threads(1)
    server_args = ["--torch-threads", "2", "--log-level", os.environ.get("BENCH_SERVER_LOG_LEVEL", "warning")]
    server_args += [arg for flag, value in (("--device", args.device), ("--dtype", args.dtype)) if value
                    for arg in (flag, value)]
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-") as tmp:
        data_dir = Path(tmp)
        model_dir = resolve_base_model(args.base_model, data_dir, allow_download=False)
        with running_server(data_dir, base_model=args.base_model, extra_args=server_args) as server:
            sdk = SdkStep(server.base_url, args.base_model)
            local = InProcessStep(model_dir, args.base_model, args.device, args.dtype)
            timed(sdk, args.warmup), timed(local, args.warmup)
            results: dict[str, list[float]] = {"SDK over HTTP": [], "in-process": []}
            while len(results["in-process"]) < args.steps:
                results["SDK over HTTP"] += timed(sdk, args.block)
                results["in-process"] += timed(local, args.block)
            sdk.close()
    report(results, args.base_model)


def report(results: dict[str, list[float]], model: str) -> None:
    table = Table(title=f"forward_backward + optim_step, {model}, batch {BATCH}x{SEQ}, LoRA rank {RANK}")
    for column in ("way", "steps", "median ms", "p90 ms", "min ms"):
        table.add_column(column, justify="right")
    for way, times in results.items():
        ms = sorted(t * 1e3 for t in times)
        table.add_row(way, str(len(ms)), f"{statistics.median(ms):.1f}", f"{ms[int(0.9 * (len(ms) - 1))]:.1f}",
                      f"{ms[0]:.1f}")
    console = Console()
    console.print(table)
    sdk, local = results["SDK over HTTP"], results["in-process"]
    ratio = statistics.median(sdk) / statistics.median(local)
    console.print(f"ratio of medians (SDK / in-process): {ratio:.3f}   ratio of mins: {min(sdk) / min(local):.3f}"
                  f"   (target <= 1.25; load average {os.getloadavg()[0]:.2f})")
    setting = {"base_model": model, "batch": BATCH, "seq": SEQ, "rank": RANK, "torch": torch.__version__,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    fig, ax = outputs.figure()
    ax.boxplot([[t * 1e3 for t in times] for times in results.values()], tick_labels=list(results), vert=False)
    ax.set_xlabel("step ms (forward_backward + optim_step)")
    ax.set_title(f"server overhead, {model}, {BATCH} x {SEQ}: ratio of medians {ratio:.2f}")
    data = {"setting": setting, "ratio_of_medians": ratio, "steps_ms": {k: [t * 1e3 for t in v] for k, v in results.items()}}
    outputs.save(f"step_overhead-{BATCH}x{SEQ}", data, fig)


if __name__ == "__main__":
    main()
