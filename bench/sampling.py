"""Sampling throughput through the SDK with 1 and with 8 adapters hot.

Against a `twinkle serve` process (tiny-qwen3, local engine, the transformers sampler), 8 LoRA
training clients (rank 8, one tenant each) save weights for a sampler once. Then, for each case,
`--requests` sample requests (a 16-token prompt, `--max-tokens` new tokens, 4 samples each,
temperature 1) are sent at once and awaited: all on one adapter, or spread round-robin over the 8.
Reported: generated tokens per second (all requests' sampled tokens over the wall time) and the
median request latency, per case, over `--rounds` alternating rounds.

Prints a table; writes JSON and a PNG under bench/results/ (sampling.*).

    .venv/bin/python bench/sampling.py [--requests 16] [--max-tokens 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import outputs  # noqa: E402 - bench/outputs.py, beside this script
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from server.process import running_server  # noqa: E402
from workers.base_models import TINY_QWEN3  # noqa: E402

ADAPTERS, SAMPLES = 8, 4


def samplers(base_url: str) -> tuple[list, list]:
    """(service clients, one sampling client per adapter)."""
    import tinker

    services = [tinker.ServiceClient(base_url=base_url, api_key=f"tml-sample-{i}") for i in range(ADAPTERS)]
    clients = [s.create_lora_training_client(TINY_QWEN3, rank=8, seed=i).result() for i, s in enumerate(services)]
    return services, [tc.save_weights_and_get_sampling_client().result() for tc in clients]


def one_round(hot: list, requests: int, max_tokens: int) -> tuple[float, list[float]]:
    """All requests at once over the `hot` samplers: (generated tokens per second, latencies)."""
    from tinker import types

    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0)
    prompt = types.ModelInput.from_ints(list(range(5, 21)))
    start = time.perf_counter()
    pending: list[tuple[Future, float]] = [
        (hot[i % len(hot)].sample(prompt, SAMPLES, params), time.perf_counter()) for i in range(requests)]
    tokens, latencies = 0, []
    for future, sent in pending:
        result = future.result()
        latencies.append(time.perf_counter() - sent)
        tokens += sum(len(seq.tokens) for seq in result.sequences)
    return tokens / (time.perf_counter() - start), latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cases = {"1 adapter": 1, f"{ADAPTERS} adapters": ADAPTERS}
    results: dict[str, list[tuple[float, list[float]]]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="twinkle-bench-") as tmp, \
            running_server(Path(tmp), extra_args=["--torch-threads", "2", "--log-level", "warning"]) as server:
        services, hot = samplers(server.base_url)
        one_round(hot, ADAPTERS, 4)  # warm-up: every adapter built in the sampler
        for rnd in range(args.rounds):
            for case in (list(cases) if rnd % 2 == 0 else list(cases)[::-1]):
                results[case].append(one_round(hot[: cases[case]], args.requests, args.max_tokens))
        for service in services:
            service.close("success").result()
    rows = [{"case": case, "tokens_per_s": statistics.median(r[0] for r in runs),
             "latency_p50_ms": statistics.median(t for r in runs for t in r[1]) * 1e3} for case, runs in results.items()]
    setting = {"base_model": TINY_QWEN3, "sampler": "hf (transformers)", "requests": args.requests,
               "samples_per_request": SAMPLES, "max_tokens": args.max_tokens, "rounds": args.rounds,
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    report(rows, setting)


def report(rows: list[dict], setting: dict) -> None:
    table = Table(title="sampling through the SDK: generated tokens/s and request latency")
    for column in ("adapters hot", "tokens/s", "request p50 ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(r["case"], f"{r['tokens_per_s']:.0f}", f"{r['latency_p50_ms']:.0f}")
    console = Console()
    console.print(table)
    console.print(", ".join(f"{k}: {v}" for k, v in setting.items()))
    fig, ax = outputs.figure()
    ax.bar([r["case"] for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set_ylabel("generated tokens/s")
    ax.set_title(f"sampling, {setting['base_model']}, {setting['requests']} requests at once")
    outputs.save("sampling", {"setting": setting, "rows": rows}, fig)


if __name__ == "__main__":
    main()
