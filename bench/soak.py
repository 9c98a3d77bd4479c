"""Soak: a steady RL-style workload against one server, watching that nothing grows.

Clients, one after another, each in its own SDK session: create a LoRA training client, then per
iteration save weights for a sampler (an in-memory version), sample 4 completions of 2 prompts,
train on them with importance_sampling, step the optimizer, and every third iteration save a
named checkpoint with a short TTL; after 6 iterations the client closes its session and the next
one starts. Retentions are shortened so that every kind of state turns over within the warm-up:
results, future rows, ended sessions, checkpoints (TTL), sampler versions.

Every few seconds it samples the server process's RSS and open files, the database's size (the
SQLite file with its WAL, or pg_database_size) and the data dir's size (logs excluded: a deployment
logs to stderr). After the warm-up, each series must stay flat: the peak of its last third within
FLAT_RATIO of the peak of its first third (open files: within FLAT_FDS). Prints a table, writes
JSON and a PNG of the curves under bench/results/.

    .venv/bin/python bench/soak.py                      # 30 minutes
    .venv/bin/python bench/soak.py --minutes 2          # the form CI runs (tests/integration/test_soak.py)
    .venv/bin/python bench/soak.py --database-url postgresql+psycopg://postgres@127.0.0.1:5432/soak
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import outputs  # noqa: E402 - bench/outputs.py, beside this script

from server.process import running_server  # noqa: E402
from workers.base_models import TINY_QWEN3, resolve_base_model  # noqa: E402

KEY = "tml-soak"
ITERATIONS_PER_CLIENT, SAVE_EVERY = 6, 3
FLAT_RATIO, FLAT_FDS = 1.10, 8
# Every retention well inside the warm-up, so the curves are past their first turnover.
RETENTIONS = {
    "TWINKLE_FUTURE_RETENTION_SECONDS": "10",
    "TWINKLE_FUTURE_ROW_RETENTION_SECONDS": "20",
    "TWINKLE_ENDED_SESSION_RETENTION_SECONDS": "15",
    "TWINKLE_REAP_INTERVAL_SECONDS": "3",
    "TWINKLE_SAMPLER_VERSION_IDLE_SECONDS": "5",
    "TWINKLE_ORPHAN_GRACE_SECONDS": "60",
}
CHECKPOINT_TTL = 10
SERIES = ("rss_mib", "open_files", "db_kib", "data_kib")


@dataclass
class Sample:
    t: float
    rss_mib: float
    open_files: int
    db_kib: float
    data_kib: float
    steps: int


@dataclass
class Report:
    minutes: float
    warmup_seconds: float
    database: str
    samples: list[Sample] = field(default_factory=list)
    steps: int = 0
    clients: int = 0
    errors: list[str] = field(default_factory=list)

    def verdicts(self) -> dict[str, tuple[float, float, bool]]:
        """Per series: (peak of the first third after warm-up, of the last third, flat?). Peaks,
        not means: the data dir swings by a checkpoint's size as TTLs pass; growth raises the peaks."""
        after = [s for s in self.samples if s.t >= self.warmup_seconds]
        third = max(1, len(after) // 3)
        out = {}
        for name in SERIES:
            first = max(getattr(s, name) for s in after[:third])
            last = max(getattr(s, name) for s in after[-third:])
            flat = last - first <= FLAT_FDS if name == "open_files" else last <= first * FLAT_RATIO
            out[name] = (first, last, flat)
        return out

    @property
    def flat(self) -> bool:
        return not self.errors and all(ok for _, _, ok in self.verdicts().values())


def rl_client(base_url: str, deadline: float, report: Report, rng: np.random.Generator) -> None:
    """One client's session: ITERATIONS_PER_CLIENT sample-then-train iterations (fewer past the deadline)."""
    import tinker
    from tinker import types

    prompts = [rng.integers(3, 4000, size=12).tolist() for _ in range(2)]
    with tinker.ServiceClient(base_url=base_url, api_key=KEY) as sc:
        tc = sc.create_lora_training_client(TINY_QWEN3, rank=4, seed=int(rng.integers(1 << 30))).result()
        for i in range(ITERATIONS_PER_CLIENT):
            if time.monotonic() > deadline:
                break
            sampler = tc.save_weights_and_get_sampling_client().result()
            params = types.SamplingParams(max_tokens=8, temperature=1.0)
            futures = [(p, sampler.sample(types.ModelInput.from_ints(p), 4, params)) for p in prompts]
            data = [datum(types, p, seq) for p, f in futures for seq in f.result().sequences]
            fb = tc.forward_backward(data, "importance_sampling")
            tc.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            fb.result()
            if i % SAVE_EVERY == SAVE_EVERY - 1:
                tc.save_state(f"it-{i}", ttl_seconds=CHECKPOINT_TTL).result()
            report.steps += 1
    report.clients += 1


def datum(types, prompt: list[int], seq) -> object:  # noqa: ANN001 - tinker's types module and a sampled sequence
    """An importance_sampling datum: the prompt and the completion, advantages on the completion."""
    tokens = prompt + list(seq.tokens)
    n_prompt, n = len(prompt) - 1, len(tokens) - 1
    logprobs = [0.0] * n_prompt + list(seq.logprobs)
    advantages = [0.0] * n_prompt + [float(len(seq.tokens) % 3 - 1)] * len(seq.tokens)
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs={
        "target_tokens": tokens[1:], "logprobs": np.array(logprobs[:n], dtype=np.float32),
        "advantages": np.array(advantages[:n], dtype=np.float32)})


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dir_kib(folder: Path) -> float:
    total = 0
    for root, dirs, names in os.walk(folder):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if d != "models"]  # the base model: the same bytes all along
        for name in names:
            path = Path(root) / name
            if not name.endswith(".log") and not path.is_symlink():
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    pass
    return total / 1024


def db_kib(data_dir: Path, database_url: str | None) -> float:
    if database_url is None:
        return sum(p.stat().st_size for p in data_dir.glob("twinkle.db*")) / 1024
    import sqlalchemy

    engine = sqlalchemy.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text("SELECT pg_database_size(current_database())")).scalar() / 1024
    finally:
        engine.dispose()


def watch(pid: int, data_dir: Path, database_url: str | None, report: Report, stop: threading.Event,
          every: float) -> None:
    started = time.monotonic()
    while not stop.wait(every):
        db = db_kib(data_dir, database_url)
        report.samples.append(Sample(round(time.monotonic() - started, 1), round(rss_mib(pid), 1),
                                     len(os.listdir(f"/proc/{pid}/fd")), round(db, 1),
                                     round(dir_kib(data_dir) - (db if database_url is None else 0), 1), report.steps))


def run(minutes: float, data_dir: Path, database_url: str | None = None, every: float = 5.0) -> Report:
    """Serve from `data_dir` and soak it for `minutes`; the first quarter (at least 45 s) is warm-up."""
    report = Report(minutes, max(45.0, minutes * 15), "postgresql" if database_url else "sqlite")
    resolve_base_model(TINY_QWEN3, data_dir, allow_download=False)  # built once, before the clock starts
    args = ["--database-url", database_url] if database_url else []
    with running_server(data_dir, extra_args=args, env=RETENTIONS) as server:
        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(server.process.pid, data_dir, database_url, report, stop, every),
                                   daemon=True)
        watcher.start()
        deadline, rng = time.monotonic() + minutes * 60, np.random.default_rng(0)
        try:
            while time.monotonic() < deadline:
                rl_client(server.base_url, deadline, report, rng)
        except Exception as exc:  # the report says what broke; the caller decides
            report.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            stop.set()
            watcher.join()
        report.errors += [line for line in server.log().splitlines() if '"level": "ERROR"' in line][:20]
    return report


def show(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"soak: {report.minutes:g} min on {report.database}, {report.clients} clients, "
                        f"{report.steps} RL iterations (warm-up {report.warmup_seconds:g} s)")
    for column in ("series", "after warm-up (peak, first third)", "end (peak, last third)", "flat"):
        table.add_column(column)
    for name, (first, last, ok) in report.verdicts().items():
        table.add_row(name, f"{first:,.1f}", f"{last:,.1f}", "yes" if ok else "NO")
    console.print(table)
    console.print(f"bounds: last third <= {FLAT_RATIO} x first third (open files: + {FLAT_FDS}); "
                  f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    for error in report.errors:
        console.print(f"[red]error:[/red] {error}")


def save(report: Report, name: str, folder: Path = outputs.RESULTS) -> tuple[Path, Path]:
    data = {**asdict(report), "verdicts": report.verdicts(), "flat": report.flat,
            "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
            "settings": {**RETENTIONS, "checkpoint_ttl": CHECKPOINT_TTL}}
    fig, axes = outputs.figure(len(SERIES), height=9)
    times = [s.t for s in report.samples]
    for ax, series in zip(axes, SERIES):
        ax.plot(times, [getattr(s, series) for s in report.samples])
        ax.axvline(report.warmup_seconds, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel(series)
        ax.set_ylim(bottom=0)
    axes[-1].set_xlabel("seconds (dashed: end of warm-up)")
    fig.suptitle(f"soak, {report.database}: {report.steps} RL iterations by {report.clients} clients")
    return outputs.save(name, data, fig, folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--database-url", help="PostgreSQL (an empty database, upgraded here); default SQLite")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = parser.parse_args()
    if args.database_url:
        from server.cli import main as cli

        assert cli(["db", "upgrade", "--database-url", args.database_url]) == 0
    with tempfile.TemporaryDirectory(prefix="twinkle-soak-") as tmp:
        report = run(args.minutes, Path(tmp), args.database_url, args.every)
    show(report)
    save(report, f"soak-{report.database}")
    raise SystemExit(0 if report.flat else 1)


if __name__ == "__main__":
    main()
