"""How long new weights take to reach a sampler: from an optim_step completing to the first sample
that uses them (save_weights_and_get_sampling_client + a 1-token sample), through the unmodified
tinker SDK.

For each engine (local, ray) and sampler backend (hf, vllm) asked for, starts a `twinkle serve`
(tiny-qwen3 by default, LoRA rank 8), then runs `--rounds` rounds of: one forward_backward +
optim_step (not timed), then the timed save + sample. Prints p50/p95 of the whole sync and of its
two parts, and writes bench/results/weight_sync.json. Target: p50 <= 100 ms for hf on the local
engine.

The vllm backend runs the server from .venv-vllm (make install-vllm); without it those rows say
so. With the Ray engine the script runs itself in a loopback-only network namespace (unshare -n;
root), like the tests.

    .venv/bin/python bench/weight_sync.py [--engines local,ray] [--samplers hf,vllm] [--rounds 20]
    # on a GPU machine, with official vllm installed in the venv the server runs from
    .venv/bin/python bench/weight_sync.py --samplers hf,vllm --device cuda --dtype bfloat16 --base-model Qwen/Qwen3-0.6B
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netns import in_loopback_namespace  # noqa: E402 - bench/, this script's own folder

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered) * 1e3, "p95_ms": p95 * 1e3}


def run_case(args: argparse.Namespace, engine: str, sampler: str, workdir: Path) -> dict:
    import numpy as np
    import tinker
    from tinker import types

    from server.process import running_server

    python = None
    if sampler == "vllm" and not args.vllm_in_this_venv:
        if not VLLM_PYTHON.exists():
            return {"engine": engine, "sampler": sampler, "skipped": "no .venv-vllm (make install-vllm)"}
        python = str(VLLM_PYTHON)
    extra = ["--engine", engine, "--sampler", sampler]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype)):
        if value:
            extra += [flag, value]
    rows = np.random.default_rng(0).integers(3, 1000, size=(8, 129))
    data = [types.Datum(model_input=types.ModelInput.from_ints(r[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": r[1:].tolist(), "weights": np.ones(128, np.float32)})
            for r in rows]
    prompt = types.ModelInput.from_ints(rows[0][:16].tolist())
    one_token = types.SamplingParams(max_tokens=1, temperature=1.0, seed=0)
    sync, save, sample = [], [], []
    with running_server(workdir / f"{engine}-{sampler}", base_model=args.base_model, extra_args=extra,
                        timeout=900, python=python) as server, \
            tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench") as service:
        tc = service.create_lora_training_client(args.base_model, rank=8, seed=0).result()
        for i in range(args.warmup + args.rounds):
            fb = tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            fb.result()
            started = time.perf_counter()
            client = tc.save_weights_and_get_sampling_client().result()
            saved = time.perf_counter()
            client.sample(prompt, 1, one_token).result()
            done = time.perf_counter()
            if i >= args.warmup:
                sync.append(done - started)
                save.append(saved - started)
                sample.append(done - saved)
    return {"engine": engine, "sampler": sampler, "rounds": args.rounds, "sync": quantiles(sync),
            "save": quantiles(save), "sample": quantiles(sample)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="local,ray")
    parser.add_argument("--samplers", default="hf,vllm")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed rounds: the sampler makes its cached adapters in the first few")
    parser.add_argument("--base-model", default="tiny-qwen3")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--vllm-in-this-venv", action="store_true",
                        help="vllm is installed where this script runs (a GPU machine): no .venv-vllm")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "weight_sync.json")
    args = parser.parse_args()
    engines, samplers = args.engines.split(","), args.samplers.split(",")
    if "ray" in engines:
        in_loopback_namespace()

    from rich.console import Console
    from rich.table import Table

    results = []
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-sync-") as tmp:
        for engine in engines:
            for sampler in samplers:
                results.append(run_case(args, engine, sampler, Path(tmp)))
    table = Table(title=f"optim_step -> first sample on the new weights, {args.base_model} rank 8, "
                        f"{args.rounds} rounds ({platform.machine()}, {os.cpu_count()} CPUs)")
    for column in ("engine", "sampler", "sync p50 ms", "sync p95 ms", "save p50 ms", "sample p50 ms"):
        table.add_column(column, justify="right")
    for r in results:
        if "skipped" in r:
            table.add_row(r["engine"], r["sampler"], r["skipped"], "", "", "")
            continue
        table.add_row(r["engine"], r["sampler"], f"{r['sync']['p50_ms']:.1f}", f"{r['sync']['p95_ms']:.1f}",
                      f"{r['save']['p50_ms']:.1f}", f"{r['sample']['p50_ms']:.1f}")
    Console(width=140).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"base_model": args.base_model, "device": args.device or "default", "cpus": os.cpu_count(),
            "python": platform.python_version(), "rounds": args.rounds}
    args.out.write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
