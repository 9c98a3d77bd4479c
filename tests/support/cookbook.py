"""Run tinker-cookbook (0.6.1) recipes, unmodified, against a local Twinkle server.

Everything here works from the outside, through the cookbook's public hooks:

* the tokenizer: the cookbook's trainers call `tokenizer_utils.get_tokenizer(model_name)` with the
  very name they send to the server as `base_model`. We register that name
  (`tokenizer_utils.register_tokenizer`) to the folder `twinkle model-path NAME` prints, so no
  model hub is needed;
* the pricing fetch: the SL/RL loops GET a pricing file from the Tinker docs site once per process
  (errors swallowed). We mark it as already fetched, so nothing leaves the machine;
* data: only local sources (a conversations JSONL, the synthetic arithmetic env, a comparisons
  JSONL) are used, through the recipes' own config options.

Used as a launcher, so every recipe runs in its own process (the recipes configure logging and
call `asyncio.run` themselves):

    python -m tests.support.cookbook --data-dir DIR --model-name tiny-qwen3 \
        RECIPE [key=value ...]

RECIPE is a module run as `__main__` with the chz arguments that follow (e.g.
`tinker_cookbook.recipes.chat_sl.train`), or `dpo`, which calls `train_dpo.main` with a
`ComparisonBuilderFromJsonl` dataset (the DPO CLI only knows HF datasets). The server is taken
from TINKER_BASE_URL / TINKER_API_KEY, as with the SDK.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "integration" / "data"
TINY_MODEL = "tiny-qwen3"


def model_path(name: str, data_dir: Path) -> Path:
    """The folder `twinkle model-path NAME --data-dir DIR` prints (weights + tokenizer)."""
    twinkle = Path(sys.executable).with_name("twinkle")  # the venv's console script
    cmd = [str(twinkle)] if twinkle.exists() else [sys.executable, "-m", "server.cli"]
    out = subprocess.run(
        [*cmd, "model-path", name, "--data-dir", str(data_dir)], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = Path(out.splitlines()[-1])
    if not (path / "tokenizer.json").is_file():
        raise RuntimeError(f"`twinkle model-path {name}` printed {out!r}, which has no tokenizer.json")
    return path


def register_local_tokenizer(name: str, folder: Path) -> None:
    """Make the cookbook's `get_tokenizer(name)` load the tokenizer in `folder`."""
    from tinker_cookbook import tokenizer_utils

    @functools.cache
    def factory():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    tokenizer_utils.register_tokenizer(name, factory)


def disable_pricing_fetch() -> None:
    """The SL/RL loops fetch a pricing file from the internet once per process (cost metrics
    only; failures are swallowed). Mark it as fetched-and-unavailable: token counts are still
    logged, and no request leaves the machine."""
    from tinker_cookbook.utils import cost_estimation

    # Its once-per-process cache (load_model_pricing); fail loudly if a cookbook release renames it.
    if not (hasattr(cost_estimation, "_pricing_fetched") and hasattr(cost_estimation, "_pricing_entries")):
        raise RuntimeError("tinker_cookbook.utils.cost_estimation changed: update disable_pricing_fetch()")
    cost_estimation._pricing_fetched = True
    cost_estimation._pricing_entries = None


def prepare(model_name: str, data_dir: Path) -> Path:
    folder = model_path(model_name, data_dir)
    register_local_tokenizer(model_name, folder)
    disable_pricing_fetch()
    return folder


def run_dpo(args: list[str]) -> None:
    """DPO on a local comparisons JSONL, through `train_dpo.main`.

    Arguments are chz `key=value` pairs of `DPOArgs` below."""
    import chz
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    @chz.chz
    class DPOArgs:
        log_path: str
        model_name: str = TINY_MODEL
        renderer_name: str = "qwen3"
        train_path: str = str(DATA / "comparisons.jsonl")
        test_path: str | None = None
        learning_rate: float = 1e-4
        dpo_beta: float = 0.1
        batch_size: int = 4
        max_length: int | None = 512
        lora_rank: int = 8
        num_epochs: int = 1
        max_steps: int | None = None
        save_every: int = 0
        base_url: str | None = None

    a = chz.entrypoint(DPOArgs, argv=args)
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=a.model_name,
        renderer_name=a.renderer_name,
        max_length=a.max_length,
        batch_size=a.batch_size,
    )
    builder = DPODatasetBuilderFromComparisons(
        common_config=common,
        comparison_builder=ComparisonBuilderFromJsonl(train_path=a.train_path, test_path=a.test_path),
    )
    config = train_dpo.Config(
        log_path=a.log_path,
        model_name=a.model_name,
        recipe_name="twinkle_dpo_jsonl",
        renderer_name=a.renderer_name,
        dataset_builder=builder,
        evaluator_builders=[],
        learning_rate=a.learning_rate,
        dpo_beta=a.dpo_beta,
        lora_rank=a.lora_rank,
        num_epochs=a.num_epochs,
        max_steps=a.max_steps,
        save_every=a.save_every,
        base_url=a.base_url,
    )
    train_dpo.main(config)


def example_conversations() -> Path:
    """The 128 chats the cookbook wheel ships (`example_data/conversations.jsonl`)."""
    import tinker_cookbook

    return Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"


@dataclass
class RecipeRun:
    log_path: Path
    output: str  # the recipe's stdout + stderr

    def metrics(self) -> list[dict]:
        """Rows of metrics.jsonl; rows without a "step" (run summaries) are left out."""
        rows = [json.loads(line) for line in (self.log_path / "metrics.jsonl").read_text().splitlines() if line]
        return [r for r in rows if "step" in r]

    def checkpoints(self) -> list[dict]:
        path = self.log_path / "checkpoints.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def run_recipe(
    recipe: str,
    args: list[str],
    *,
    base_url: str,
    api_key: str,
    data_dir: Path,
    log_path: Path,
    timeout: float = 240,
) -> RecipeRun:
    """Run `recipe` (see the module docstring) in a fresh interpreter against the server at
    base_url; `log_path=...` is appended to args. Raises AssertionError with the output's tail
    if the recipe fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TINKER_BASE_URL": base_url,
        "TINKER_API_KEY": api_key,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "-m", "tests.support.cookbook", "--data-dir", str(data_dir),
           recipe, *args, f"log_path={log_path}"]
    # cwd outside the repo: the recipes record `git diff` of their working directory in the log dir.
    proc = subprocess.run(cmd, cwd=log_path.parent, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{recipe} exited with {proc.returncode}:\n{output[-6000:]}")
    return RecipeRun(log_path, output)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the server's data dir")
    parser.add_argument("--model-name", default=TINY_MODEL)
    parser.add_argument("recipe")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    prepare(ns.model_name, ns.data_dir)
    if ns.recipe == "dpo":
        run_dpo(ns.args)
        return
    sys.argv = [ns.recipe, *ns.args]
    runpy.run_module(ns.recipe, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
