"""tinker-cookbook 0.6.1 recipes, unmodified, train tiny-qwen3 on a real server with local data.

Each recipe runs in its own interpreter through tests/support/cookbook.py, which
registers the tokenizer from `twinkle model-path tiny-qwen3` under the served name and keeps the
recipes off the internet. One run per recipe (module fixtures); the tests read its log dir and
ask the server (RestClient) what it stored.

  * supervised: `recipes/chat_sl/train.py` on the wheel's example conversations, with periodic,
    rolling and final checkpoints, then an interrupted run resumed from its last checkpoint;
  * RL: `recipes/math_rl/train.py`, synthetic arithmetic env, `importance_sampling`, 2 substeps,
    periodic checkpoints (each step samples from a fresh sampler of the current weights);
  * DPO: `preference/train_dpo.main` with `ComparisonBuilderFromJsonl` on data/comparisons.jsonl.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tinker

from tests.support.cookbook import DATA, RecipeRun, example_conversations, run_recipe

pytestmark = pytest.mark.slow

KEY = "tml-cookbook"
CHAT_SL = "tinker_cookbook.recipes.chat_sl.train"
MATH_RL = "tinker_cookbook.recipes.math_rl.train"
COMMON = ["model_name=tiny-qwen3", "renderer_name=qwen3", "lora_rank=8"]

SL_ARGS = [*COMMON, f"dataset={example_conversations()}", "batch_size=8", "max_length=512",
           "learning_rate=1e-3", "eval_every=0", "save_every=4", "rolling_save_every=2", "max_steps=6"]
SL_STEPS = 6
RL_ARGS = [*COMMON, "env=arithmetic", "group_size=4", "groups_per_batch=2", "max_tokens=8",
           "learning_rate=1e-3", "eval_every=0", "save_every=2", "max_steps=3",
           "loss_fn=importance_sampling", "num_substeps=2"]
RL_STEPS = 3
DPO_ARGS = ["batch_size=4", "learning_rate=1e-3", "max_steps=3", f"train_path={DATA / 'comparisons.jsonl'}"]
DPO_STEPS = 3


def _run(server, data_dir: Path, log_path: Path, recipe: str, args: list[str]) -> RecipeRun:
    return run_recipe(recipe, args, base_url=server.base_url, api_key=KEY, data_dir=data_dir, log_path=log_path)


def _listed(server, tinker_path: str) -> dict[str, tinker.types.Checkpoint]:
    """checkpoint_id -> Checkpoint, as the server lists them for the run `tinker_path` belongs to."""
    run_id = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path).training_run_id
    rest = tinker.RestClient(base_url=server.base_url, api_key=KEY)
    return {c.checkpoint_id: c for c in rest.list_checkpoints(run_id).result().checkpoints}


@pytest.fixture(scope="module")
def chat_sl(server, data_dir, tmp_path_factory) -> RecipeRun:
    log = tmp_path_factory.mktemp("cookbook") / "chat_sl"
    return _run(server, data_dir, log, CHAT_SL, [*SL_ARGS, "behavior_if_log_dir_exists=delete"])


@pytest.fixture(scope="module")
def math_rl(server, data_dir, tmp_path_factory) -> RecipeRun:
    log = tmp_path_factory.mktemp("cookbook") / "math_rl"
    return _run(server, data_dir, log, MATH_RL, [*RL_ARGS, "behavior_if_log_dir_exists=delete"])


@pytest.fixture(scope="module")
def dpo(server, data_dir, tmp_path_factory) -> RecipeRun:
    log = tmp_path_factory.mktemp("cookbook") / "dpo"
    return _run(server, data_dir, log, "dpo", DPO_ARGS)


# --------------------------------------------------------------------------- tokenizer + renderer


def test_tiny_tokenizer_fits_the_qwen3_renderer(tiny_model_dir: Path) -> None:
    from tinker_cookbook.renderers import get_renderer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert len(tok) <= 4096  # the model's vocab_size
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    ids = {t: tok.encode(t, add_special_tokens=False) for t in special + added}
    assert all(len(v) == 1 for v in ids.values()), ids
    decoded = tok.decode([ids[t][0] for t in special + added], skip_special_tokens=True)
    assert decoded == "".join(added)  # ChatML tokens are special, the Qwen3 tags are not

    renderer = get_renderer("qwen3", tok)
    assert renderer.get_stop_sequences() == ids["<|im_end|>"]
    prompt = renderer.build_generation_prompt([{"role": "user", "content": "What is 2 + 2?"}])
    assert tok.decode(prompt.to_ints()) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    reply = '<think>\nadd\n</think>\n\n4<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call><|im_end|>'
    message, termination = renderer.parse_response(tok.encode(reply, add_special_tokens=False))
    assert termination.is_clean
    assert message["content"] == [{"type": "thinking", "thinking": "add"}, {"type": "text", "text": "4"}]
    assert message["tool_calls"][0].function.name == "f"


# --------------------------------------------------------------------------- supervised (chat_sl)


def test_chat_sl_loss_decreases(chat_sl: RecipeRun) -> None:
    rows = chat_sl.metrics()
    assert [r["step"] for r in rows] == list(range(SL_STEPS))
    nll = [r["train_mean_nll"] for r in rows]
    assert all(math.isfinite(x) for x in nll), nll
    assert nll[0] == pytest.approx(math.log(4096), abs=0.3)  # a random model starts near uniform
    assert nll[-1] < nll[0] - 0.3, nll
    assert all(r["num_sequences"] == 8 and r["num_tokens"] > 0 for r in rows)


def test_chat_sl_checkpoints_are_listed_with_their_ttl(chat_sl: RecipeRun, server) -> None:
    records = {c["name"]: c for c in chat_sl.checkpoints()}
    assert {"000004", "final"} <= set(records), records
    listed = _listed(server, records["final"]["state_path"])
    for name in ("000004", "final"):
        for key, kind in (("state_path", "training"), ("sampler_path", "sampler")):
            path = records[name][key]
            cid = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(path).checkpoint_id
            assert listed[cid].tinker_path == path and listed[cid].checkpoint_type == kind
    # periodic saves ask for a 7-day TTL, the final one for none
    assert listed["weights/000004"].expires_at is not None
    assert listed["weights/final"].expires_at is None


def test_chat_sl_rolling_checkpoint_is_deleted(chat_sl: RecipeRun, server) -> None:
    """The rolling save (state only, 2 h TTL) is deleted through REST once the next save lands."""
    records = {c["name"]: c for c in chat_sl.checkpoints()}
    rolling = records["000002"]
    assert rolling.get("rolling") is True
    assert "Failed to delete rolling checkpoint" not in chat_sl.output
    assert "weights/000002" not in _listed(server, rolling["state_path"])


def test_chat_sl_resumes_from_its_last_checkpoint(chat_sl: RecipeRun, server, data_dir, tmp_path) -> None:
    """A run "interrupted" after step 5 (its final checkpoint dropped from checkpoints.jsonl)
    resumes from 000004 (REST training-run lookup + weights and optimizer state) at batch 4."""
    log = tmp_path / "chat_sl_resumed"
    log.mkdir()
    records = [c for c in chat_sl.checkpoints() if c["name"] != "final"]
    (log / "checkpoints.jsonl").write_text("".join(json.dumps(c) + "\n" for c in records))
    resumed = _run(server, data_dir, log, CHAT_SL, [*SL_ARGS, "behavior_if_log_dir_exists=resume"])
    assert f"Resumed training from {records[-1]['state_path']}" in resumed.output
    rows = resumed.metrics()
    assert [r["step"] for r in rows] == [4, 5]
    original = {r["step"]: r for r in chat_sl.metrics()}
    for row in rows:
        assert row["learning_rate"] == pytest.approx(original[row["step"]]["learning_rate"])
    # The recipe submits one step ahead (submit_ahead=1), so checkpoint 000004 is taken after
    # step 5's update was queued: the server runs a model's requests in order, hence the resumed
    # weights have seen steps 0-5 and fit batch 4 better than they did at step 4.
    assert rows[0]["train_mean_nll"] < original[4]["train_mean_nll"] - 0.01


# --------------------------------------------------------------------------- RL (math_rl)


def test_math_rl_samples_and_trains(math_rl: RecipeRun) -> None:
    rows = [r for r in math_rl.metrics() if "env/all/total_episodes" in r]
    assert [r["step"] for r in rows] == list(range(RL_STEPS))
    for r in rows:
        assert r["env/all/total_episodes"] == 8  # groups_per_batch * group_size sampled episodes
        assert r["tokens/sampled"] > 0 and r["tokens/trained"] > r["tokens/sampled"]
        assert 0 < r["env/all/ac_tokens_per_turn"] <= 8  # max_tokens is honoured
        # The trainer's logprobs of the sampled tokens equal the sampler's: on-policy.
        assert abs(r["optim/kl_sample_train_v1"]) < 1e-3, r
        assert math.isfinite(r["optim/entropy"]) and r["optim/entropy"] > 0
    assert len(list(math_rl.log_path.glob("iteration_*/train_rollout_summaries.jsonl"))) == RL_STEPS


def test_math_rl_checkpoints_are_listed(math_rl: RecipeRun, server) -> None:
    records = {c["name"]: c for c in math_rl.checkpoints()}
    assert {"000002", "final"} <= set(records), records
    listed = _listed(server, records["final"]["sampler_path"])
    for record in records.values():
        for key in ("state_path", "sampler_path"):
            cid = tinker.types.ParsedCheckpointTinkerPath.from_tinker_path(record[key]).checkpoint_id
            assert cid in listed, (cid, sorted(listed))


# --------------------------------------------------------------------------- DPO


def test_dpo_learns_the_preference(dpo: RecipeRun, server) -> None:
    rows = dpo.metrics()
    assert [r["step"] for r in rows] == list(range(DPO_STEPS))
    assert all(r["num_pairs"] == 4 for r in rows)
    # Step 0: the policy is the reference (its sampler weights' compute_logprobs vs the trainer's
    # forward), so every margin is 0 and the loss is log 2.
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[0]["margin"] == pytest.approx(0, abs=1e-2)
    assert rows[-1]["dpo_loss"] < rows[0]["dpo_loss"] - 0.2
    assert rows[-1]["accuracy"] >= 0.75 and rows[-1]["margin"] > 0
    final = {c["name"]: c for c in dpo.checkpoints()}["final"]
    listed = _listed(server, final["state_path"])
    assert {"weights/final", "sampler_weights/final"} <= set(listed)
