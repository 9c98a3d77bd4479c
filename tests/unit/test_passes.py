"""Requests in passes under a token budget (workers/passes.py, LoraTrainer.forward_backward_groups).

The property: whatever the mix of lengths, the loss and the pass budget, a request computed in
passes (with its layers checkpointed) gives the loss, the metrics, the logprobs and (after an
optim_step) the weights that the same request computes in one pass, to 1e-5 in float32."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.lora import custom_loss, datum, magnitude, perturb_b
from workers.custom_loss import CustomLossError
from workers.losses import LOSSES
from workers.passes import ActivationCost, activation_cost, plan_passes, target_logprobs, tokens_per_pass
from workers.trainer import LoraTrainer, load_base_model
from workers.types import AdamConfig, BaseModelInfo, LoraSpec

VOCAB = 4096
INFO = BaseModelInfo(name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=VOCAB, max_context_length=4096)
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")


# ----- planning ---------------------------------------------------------------------------------
def test_passes_keep_padded_size_within_the_budget_and_cover_every_datum_once() -> None:
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
        budget = rng.randint(1, 300)
        passes = plan_passes(lengths, budget)
        assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
        for p in passes:
            padded = len(p) * max(lengths[i] for i in p)
            assert padded <= budget or len(p) == 1  # a datum longer than the budget goes alone


def test_one_pass_when_everything_fits_and_longest_first() -> None:
    assert plan_passes([3, 5, 4], 100) == [[1, 2, 0]]
    assert plan_passes([3, 5, 4], 8) == [[1], [2, 0]]
    assert plan_passes([10], 4) == [[0]]


def test_the_pass_budget_follows_the_model_and_the_memory() -> None:
    from transformers import Qwen3Config

    tiny = activation_cost(Qwen3Config(hidden_size=256, intermediate_size=768, num_hidden_layers=4))
    assert tiny.full == 4 * 4 * (28 * 256 + 8 * 768) and tiny.checkpointed < 0.6 * tiny.full
    assert tokens_per_pass(tiny, 1 << 30, checkpointing=False) == (1 << 30) // tiny.full
    assert tokens_per_pass(tiny, 1 << 30, checkpointing=True) > 1.5 * tokens_per_pass(tiny, 1 << 30, checkpointing=False)
    assert tokens_per_pass(ActivationCost(10**9, 10**9), 1, checkpointing=True) == 256  # never below
    assert tokens_per_pass(ActivationCost(1, 1), 1 << 40, checkpointing=True) == 1 << 16  # nor above
    deep = activation_cost(Qwen3Config(hidden_size=576, intermediate_size=1536, num_hidden_layers=30))
    assert deep.checkpointed < deep.full / 10  # checkpointing pays most on deep models


# ----- chunked logprobs -------------------------------------------------------------------------
@pytest.mark.parametrize("logit_elements", [1, 37 * 11, 10**9])
def test_chunked_target_logprobs_and_gradients_equal_the_full_log_softmax(logit_elements: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 37)
    targets = torch.randint(0, 37, (3, 5))
    want = torch.log_softmax(head(hidden), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = target_logprobs(hidden, targets, head, 37, logit_elements)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    upstream = torch.randn(3, 5)
    want_grads = torch.autograd.grad((want * upstream).sum(), [hidden, head.weight])
    got_grads = torch.autograd.grad((got * upstream).sum(), [hidden, head.weight])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


# ----- the property ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> LoraTrainer:
    # logit_elements small enough that the logprobs of most passes are computed in several chunks
    return LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0, logit_elements=VOCAB * 16)


@pytest.mark.parametrize("loss_name", [*LOSSES, "custom"])
@pytest.mark.parametrize("seed", range(3))
def test_passes_compute_what_one_pass_computes(trainer: LoraTrainer, loss_name: str, seed: int) -> None:
    rng = np.random.default_rng(seed * 100 + len(loss_name))
    loss = custom_loss() if loss_name == "custom" else LOSSES[loss_name]
    groups = [[datum(rng, int(n), loss_name) for n in rng.integers(1, 40, size=rng.integers(1, 6))]
              for _ in range(rng.integers(1, 4))]
    lengths = [len(d.tokens) for g in groups for d in g]
    budget = int(rng.integers(min(lengths), sum(lengths) + 1))
    spec = LoraSpec(rank=4, seed=seed)
    results, weights = {}, {}
    # "split" also runs its layers under activation checkpointing (a pass memory of 1 byte)
    for name, pass_tokens, memory in (("whole", 10**9, 10**12), ("split", budget, 1)):
        trainer.create_adapter(name, spec)
        try:
            perturb_b(trainer, name, seed)
            trainer.max_tokens_per_pass, trainer.pass_memory_bytes = pass_tokens, memory
            forward = trainer.forward_backward_groups(name, groups, loss, {}, forward_only=True)
            results[name] = (forward, trainer.forward_backward_groups(name, groups, loss, {}))
            trainer.optim_step(name, AdamConfig(learning_rate=1e-2))
            weights[name] = {k: p.detach().clone() for k, p in trainer._adapter(name).params.items()}
        finally:
            trainer.remove_adapter(name)
    assert len(plan_passes(lengths, budget)) >= 1
    for whole, split in zip(*(results[n] for n in ("whole", "split"))):
        for a, b, group in zip(whole, split, groups):
            assert a.metrics.keys() == b.metrics.keys()
            for key in a.metrics:
                tol = max(1e-5, 1e-6 * magnitude(group, a.outputs))
                assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-5, abs=tol), key
            for oa, ob in zip(a.outputs, b.outputs):
                np.testing.assert_allclose(ob["logprobs"], oa["logprobs"], rtol=0, atol=1e-5)
    for key, w in weights["whole"].items():
        torch.testing.assert_close(weights["split"][key], w, rtol=1e-5, atol=1e-5)


def test_a_call_that_fails_in_a_later_pass_leaves_the_gradients_as_they_were(trainer: LoraTrainer) -> None:
    rng = np.random.default_rng(7)
    loss = custom_loss()
    trainer.create_adapter("fails", LoraSpec(rank=4, seed=1))
    try:
        perturb_b(trainer, "fails", 1)
        trainer.max_tokens_per_pass, trainer.pass_memory_bytes = 40, 10**12
        trainer.forward_backward("fails", [datum(rng, 20, "custom")], loss, {})  # a gradient already there
        before = {k: p.grad.clone() for k, p in trainer._adapter("fails").params.items() if p.grad is not None}
        broken = datum(rng, 3, "custom")
        del broken.loss_fn_inputs["weights"]  # the shortest datum: its pass comes last
        data = [datum(rng, 30, "custom"), datum(rng, 25, "custom"), broken]
        with pytest.raises(CustomLossError, match="needs loss_fn_inputs"):
            trainer.forward_backward("fails", data, loss, {})
        after = {k: p.grad for k, p in trainer._adapter("fails").params.items() if p.grad is not None}
        assert after.keys() == before.keys()
        for key, grad in before.items():
            assert torch.equal(after[key], grad), key
    finally:
        trainer.remove_adapter("fails")
