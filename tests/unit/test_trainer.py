"""LoraTrainer (workers/trainer.py) on the real tiny-qwen3, real peft and real torch.

Every expectation is computed independently of the code under test: per-datum forward passes
without padding, losses written out in torch, a hand-run torch.optim.AdamW, plain peft loading.
Fresh LoRA adapters have B = 0 (no effect on the output and no gradient for A), so most tests
first give B random values to make every parameter matter.
"""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from schemas.wire import DatumIn
from tests.support.lora import perturb_b
from workers import adapter_files as files
from workers.adapter_files import CheckpointFormatError
from workers.losses import get_loss
from workers.trainer import AdapterError, LoraTrainer, load_base_model
from workers.types import AdamConfig, BaseModelInfo, LoraSpec

VOCAB = 4096
INFO = BaseModelInfo(
    name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=VOCAB, max_context_length=4096, eos_token_ids=(2,)
)
CE = get_loss("cross_entropy")
IS = get_loss("importance_sampling")
# Teardown deletes the active adapter; peft says so each time.
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# ----- fixtures and helpers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> LoraTrainer:
    return LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)


_names = itertools.count()


@pytest.fixture
def names(trainer: LoraTrainer):
    """Fresh adapter names; whatever exists under them at teardown is removed."""
    used: list[str] = []

    def new() -> str:
        used.append(f"t{next(_names)}")
        return used[-1]

    yield new
    for name in used:
        trainer.remove_adapter(name)


@pytest.fixture
def make(trainer: LoraTrainer, names):
    def make(spec: LoraSpec = LoraSpec(rank=4, seed=0), *, perturb: int | None = 0) -> str:
        name = names()
        trainer.create_adapter(name, spec)
        if perturb is not None:
            perturb_b(trainer, name, perturb)
        return name

    return make


def params_of(trainer: LoraTrainer, name: str) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in trainer._adapter(name).params.items()}


def grads_of(trainer: LoraTrainer, name: str) -> dict[str, torch.Tensor | None]:
    return {k: None if p.grad is None else p.grad.clone() for k, p in trainer._adapter(name).params.items()}


def opt_state_of(trainer: LoraTrainer, name: str) -> dict[str, dict[str, torch.Tensor]]:
    adapter = trainer._adapter(name)
    if adapter.optimizer is None:
        return {}
    return {
        k: {slot: torch.as_tensor(v).clone() for slot, v in adapter.optimizer.state[p].items()}
        for k, p in adapter.params.items()
        if p in adapter.optimizer.state
    }


def assert_same(a: dict, b: dict) -> None:
    """Bit-identical dicts of tensors (or of dicts of tensors, or None)."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            assert_same(x, y)
        elif x is None or y is None:
            assert x is None and y is None, key
        else:
            assert torch.equal(x, y), key


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def ce_datum(rng: np.random.Generator, n: int, *, weights: bool = True) -> DatumIn:
    inputs = {"target_tokens": rng.integers(3, VOCAB, n).astype(np.int64)}
    if weights:
        inputs["weights"] = rng.standard_normal(n).astype(np.float32)  # negative weights included
    return DatumIn(tokens=rng.integers(3, VOCAB, n).astype(np.int64), loss_fn_inputs=inputs)


def is_datum(rng: np.random.Generator, n: int) -> DatumIn:
    return DatumIn(
        tokens=rng.integers(3, VOCAB, n).astype(np.int64),
        loss_fn_inputs={
            "target_tokens": rng.integers(3, VOCAB, n).astype(np.int64),
            "logprobs": rng.uniform(-9.0, -7.5, n).astype(np.float32),
            "advantages": rng.standard_normal(n).astype(np.float32),
        },
    )


def ce_batch(seed: int, lengths=(6, 3, 9)) -> list[DatumIn]:
    rng = np.random.default_rng(seed)
    return [ce_datum(rng, n) for n in lengths]


def reference_datum(trainer: LoraTrainer, name: str | None, d: DatumIn, loss_name: str):
    """Unpadded forward of one datum and its loss written out in torch: (logprobs, loss, grads)."""
    with trainer.using(name) as model:
        logits = model(input_ids=torch.from_numpy(d.tokens)[None]).logits[0]
    targets = torch.from_numpy(d.loss_fn_inputs["target_tokens"])
    lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None])[:, 0]
    x = {k: torch.from_numpy(v).double() for k, v in d.loss_fn_inputs.items() if k != "target_tokens"}
    if loss_name == "cross_entropy":
        loss = -(lp * x.get("weights", torch.ones_like(lp))).sum()
    else:
        loss = -(torch.exp(lp - x["logprobs"]) * x["advantages"]).sum()
    grads = None
    if name is not None:
        keys = list(trainer._adapter(name).params)
        g = torch.autograd.grad(loss, [trainer._adapter(name).params[k] for k in keys])
        grads = dict(zip(keys, g))
    return lp.detach().numpy(), float(loss.detach()), grads


def fb(trainer: LoraTrainer, name: str, data: list[DatumIn], loss=CE, forward_only: bool = False):
    return trainer.forward_backward(name, data, loss, {}, forward_only=forward_only)


# ----- (a) ragged batches equal per-datum computation -----------------------------------------
@pytest.mark.parametrize("loss_name", ["cross_entropy", "importance_sampling"])
def test_ragged_batch_equals_unpadded_per_datum(trainer: LoraTrainer, make, loss_name: str) -> None:
    name = make(LoraSpec(rank=4, seed=1), perturb=1)
    rng = np.random.default_rng(10)
    maker = ce_datum if loss_name == "cross_entropy" else is_datum
    data = [maker(rng, n) for n in (7, 2, 12, 1, 5)]
    refs = [reference_datum(trainer, name, d, loss_name) for d in data]

    res = fb(trainer, name, data, get_loss(loss_name))

    assert len(res.outputs) == len(data)
    for out, d, (ref_lp, _, _) in zip(res.outputs, data, refs):
        assert out["logprobs"].dtype == np.float32
        assert out["logprobs"].shape == d.loss_fn_inputs["target_tokens"].shape
        np.testing.assert_allclose(out["logprobs"], ref_lp, atol=1e-5, rtol=0)
    if loss_name == "cross_entropy":
        assert set(res.metrics) == {"loss:sum"}
    else:  # the sampler's logprobs against this forward's, over the tokens that carry one
        gaps = []
        for d, (ref_lp, _, _) in zip(data, refs):
            sampled = d.loss_fn_inputs["logprobs"] != 0
            gaps.append(np.abs(ref_lp - d.loss_fn_inputs["logprobs"])[sampled].mean() if sampled.any() else 0.0)
        assert set(res.metrics) == {"loss:sum", "sampler_logprob_gap:mean"}
        assert res.metrics["sampler_logprob_gap:mean"] == pytest.approx(np.mean(gaps), abs=1e-5)
    assert res.metrics["loss:sum"] == pytest.approx(sum(r[1] for r in refs), abs=1e-5 * len(data), rel=1e-5)

    grads = grads_of(trainer, name)
    for key, got in grads.items():
        want = sum(r[2][key] for r in refs)
        scale = float(want.abs().max())
        assert scale > 0, f"{key}: reference gradient is zero, the test would be vacuous"
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-5 * max(scale, 1.0), rtol=1e-4)


def test_cross_entropy_without_weights_counts_every_token_once(trainer: LoraTrainer, make) -> None:
    name = make(LoraSpec(rank=4, seed=1), perturb=2)
    rng = np.random.default_rng(11)
    data = [ce_datum(rng, n, weights=False) for n in (4, 8)]
    refs = [reference_datum(trainer, name, d, "cross_entropy") for d in data]
    res = fb(trainer, name, data, forward_only=True)
    assert res.metrics["loss:sum"] == pytest.approx(sum(r[1] for r in refs), rel=1e-5)
    assert res.metrics["loss:sum"] == pytest.approx(-sum(r[0].sum() for r in refs), rel=1e-5)


def test_padding_is_invisible_to_each_datum(trainer: LoraTrainer, make) -> None:
    """A datum's logprobs do not depend on which (longer) datums share its batch."""
    name = make(LoraSpec(rank=4, seed=1), perturb=3)
    rng = np.random.default_rng(12)
    short = ce_datum(rng, 3)
    alone = fb(trainer, name, [short], forward_only=True).outputs[0]["logprobs"]
    padded = fb(trainer, name, [ce_datum(rng, 20), short, ce_datum(rng, 11)], forward_only=True).outputs[1]["logprobs"]
    np.testing.assert_allclose(padded, alone, atol=1e-5, rtol=0)


# ----- (b) gradient accumulation across calls ------------------------------------------------
def test_two_calls_then_step_equal_one_union_call(trainer: LoraTrainer, make) -> None:
    spec = LoraSpec(rank=4, seed=2)
    split, union = make(spec, perturb=4), make(spec, perturb=4)
    assert_same(params_of(trainer, split), params_of(trainer, union))
    b1, b2 = ce_batch(20, (5, 9)), ce_batch(21, (3, 7, 4))
    adam = AdamConfig(learning_rate=1e-3, weight_decay=0.01)

    r1, r2 = fb(trainer, split, b1), fb(trainer, split, b2)
    ru = fb(trainer, union, b1 + b2)
    assert r1.metrics["loss:sum"] + r2.metrics["loss:sum"] == pytest.approx(ru.metrics["loss:sum"], rel=1e-5)
    g_split, g_union = grads_of(trainer, split), grads_of(trainer, union)
    for key in g_split:
        scale = float(g_union[key].abs().max())
        torch.testing.assert_close(g_split[key], g_union[key], atol=1e-5 * max(scale, 1.0), rtol=1e-4)

    trainer.optim_step(split, adam)
    trainer.optim_step(union, adam)
    assert max_diff(params_of(trainer, split), params_of(trainer, union)) <= 1e-6
    # optim_step consumed the gradients: nothing leaks into the next accumulation window.
    assert all(g is None for g in grads_of(trainer, split).values())

    b3 = ce_batch(22, (6,))
    fb(trainer, split, b3)
    fb(trainer, union, b3)
    for key, g in grads_of(trainer, split).items():
        torch.testing.assert_close(g, grads_of(trainer, union)[key], atol=1e-5, rtol=1e-4)
    trainer.optim_step(split, adam)
    trainer.optim_step(union, adam)
    assert max_diff(params_of(trainer, split), params_of(trainer, union)) <= 1e-6


def test_gradients_accumulate_until_optim_step(trainer: LoraTrainer, make) -> None:
    name = make(LoraSpec(rank=4, seed=2), perturb=5)
    batch = ce_batch(23, (4, 6))
    fb(trainer, name, batch)
    once = grads_of(trainer, name)
    fb(trainer, name, batch)
    twice = grads_of(trainer, name)
    for key in once:
        torch.testing.assert_close(twice[key], 2 * once[key], atol=1e-6, rtol=1e-6)


# ----- (c) adapters are isolated ---------------------------------------------------------------
def test_adapters_of_different_ranks_and_targets_are_isolated(trainer: LoraTrainer, make) -> None:
    x = make(LoraSpec(rank=2, seed=3, train_attn=True, train_mlp=False, train_unembed=False), perturb=6)
    y = make(LoraSpec(rank=8, seed=4, train_attn=False, train_mlp=True, train_unembed=True), perturb=7)

    x_keys, y_keys = list(trainer._adapter(x).params), list(trainer._adapter(y).params)
    assert x_keys and all(any(f".{m}." in k for m in ATTN) for k in x_keys)
    assert y_keys and all(any(f".{m}." in k for m in (*MLP, "lm_head")) for k in y_keys)
    assert any(".lm_head." in k for k in y_keys)
    assert {m for k in x_keys for m in ATTN if f".{m}." in k} == set(ATTN)
    assert {m for k in y_keys for m in MLP if f".{m}." in k} == set(MLP)
    for key, p in trainer._adapter(x).params.items():
        assert (p.shape[0] if ".lora_A." in key else p.shape[1]) == 2
    for key, p in trainer._adapter(y).params.items():
        assert (p.shape[0] if ".lora_A." in key else p.shape[1]) == 8

    adam = AdamConfig(learning_rate=1e-3, weight_decay=0.1, grad_clip_norm=1.0)
    # x: one step taken (optimizer state exists) and gradients pending for the next one.
    fb(trainer, x, ce_batch(30))
    trainer.optim_step(x, adam)
    fb(trainer, x, ce_batch(31))
    x_params, x_grads, x_opt = params_of(trainer, x), grads_of(trainer, x), opt_state_of(trainer, x)
    assert x_opt and all(g is not None for g in x_grads.values())
    marker = f".{y}."
    others = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if marker not in n}
    assert any(".lora_" not in n for n in others)  # the base weights are part of the snapshot
    y_before = params_of(trainer, y)

    for seed in (32, 33):
        fb(trainer, y, ce_batch(seed))
        trainer.optim_step(y, adam)
    fb(trainer, y, ce_batch(34), forward_only=True)
    fb(trainer, y, [is_datum(np.random.default_rng(35), 6)], loss=IS)
    trainer.optim_step(y, adam)

    assert max_diff(params_of(trainer, y), y_before) > 1e-4  # y did train
    assert_same(params_of(trainer, x), x_params)
    assert_same(grads_of(trainer, x), x_grads)
    assert_same(opt_state_of(trainer, x), x_opt)
    now = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if marker not in n}
    assert_same(now, others)

    # And the other way round: x's step leaves y alone.
    y_params, y_opt = params_of(trainer, y), opt_state_of(trainer, y)
    trainer.optim_step(x, adam)
    assert max_diff(params_of(trainer, x), x_params) > 1e-4
    assert_same(params_of(trainer, y), y_params)
    assert_same(opt_state_of(trainer, y), y_opt)
    assert all(g is None for g in grads_of(trainer, y).values())


def test_removing_an_adapter_leaves_others_working(trainer: LoraTrainer, make) -> None:
    a, b = make(LoraSpec(rank=4, seed=5), perturb=8), make(LoraSpec(rank=4, seed=6), perturb=9)
    batch = ce_batch(36)
    before = fb(trainer, a, batch, forward_only=True).outputs
    trainer.remove_adapter(b)
    assert not trainer.has_adapter(b)
    after = fb(trainer, a, batch, forward_only=True).outputs
    for o1, o2 in zip(before, after):
        np.testing.assert_array_equal(o1["logprobs"], o2["logprobs"])
    with pytest.raises(AdapterError):
        fb(trainer, b, batch)


# ----- (d) LoRA init depends on the seed only ---------------------------------------------------
def test_lora_init_depends_on_seed_only(trainer: LoraTrainer, make) -> None:
    spec = LoraSpec(rank=4, seed=7)
    torch.manual_seed(1)
    rng_state = torch.get_rng_state()
    a = make(spec, perturb=None)
    assert torch.equal(torch.get_rng_state(), rng_state), "create_adapter must not consume the global RNG"
    torch.manual_seed(999)
    torch.rand(100)
    make(LoraSpec(rank=8, seed=7), perturb=None)  # another adapter in between
    b = make(spec, perturb=None)
    c = make(LoraSpec(rank=4, seed=8), perturb=None)

    pa, pb, pc = params_of(trainer, a), params_of(trainer, b), params_of(trainer, c)
    assert_same(pa, pb)
    a_keys = [k for k in pa if ".lora_A." in k]
    assert all(not torch.equal(pa[k], pc[k]) for k in a_keys)
    assert all(float(pa[k].abs().max()) > 0 for k in a_keys)
    # peft's LoRA starts as the identity: B = 0, so a fresh adapter is the base model.
    assert all(float(p.abs().max()) == 0 for k, p in pa.items() if ".lora_B." in k)
    batch = ce_batch(40)
    fresh = fb(trainer, a, batch, forward_only=True).outputs
    for d, out in zip(batch, fresh):
        ref_lp, _, _ = reference_datum(trainer, None, d, "cross_entropy")
        np.testing.assert_allclose(out["logprobs"], ref_lp, atol=1e-5, rtol=0)


# ----- (e) optim_step is torch.optim.AdamW -----------------------------------------------------
ADAM_RUNS = {
    "defaults": [AdamConfig(learning_rate=1e-3), AdamConfig(learning_rate=1e-3), AdamConfig(learning_rate=3e-4)],
    "decay_and_active_clip": [
        AdamConfig(learning_rate=2e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.3, grad_clip_norm=0.5),
        AdamConfig(learning_rate=2e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.3, grad_clip_norm=0.5),
        AdamConfig(learning_rate=1e-3, beta1=0.8, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip_norm=2.0),
    ],
    "inactive_clip": [AdamConfig(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1e6)] * 2,
}


@pytest.mark.parametrize("run", list(ADAM_RUNS))
def test_optim_step_matches_hand_run_torch_adamw(trainer: LoraTrainer, make, run: str) -> None:
    name = make(LoraSpec(rank=4, seed=9), perturb=10)
    keys = list(trainer._adapter(name).params)
    ref = [p.clone().requires_grad_(True) for p in params_of(trainer, name).values()]
    ref_opt: torch.optim.AdamW | None = None
    for step, adam in enumerate(ADAM_RUNS[run]):
        fb(trainer, name, ce_batch(50 + step))
        grads = grads_of(trainer, name)
        for r, k in zip(ref, keys):
            r.grad = grads[k].clone()
        norm = float(np.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values())))
        hyper = dict(
            lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps, weight_decay=adam.weight_decay
        )
        if ref_opt is None:
            ref_opt = torch.optim.AdamW(ref, **hyper)
        else:
            for group in ref_opt.param_groups:
                group.update(hyper)
        if adam.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref, adam.grad_clip_norm)
        if run == "decay_and_active_clip":
            assert norm > adam.grad_clip_norm, "clipping must be active in this run"
        before = params_of(trainer, name)
        ref_opt.step()

        metrics = trainer.optim_step(name, adam)

        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)
        after = params_of(trainer, name)
        want = dict(zip(keys, (r.detach() for r in ref)))
        assert max_diff(after, want) <= 1e-7, f"step {step}"
        assert max_diff(after, before) > 0.5 * adam.learning_rate  # the step did move the weights
        assert all(g is None for g in grads_of(trainer, name).values())


def test_weight_decay_is_decoupled(trainer: LoraTrainer, make) -> None:
    """With zero gradients Adam's update is 0, so AdamW only shrinks weights by (1 − lr·wd)."""
    name = make(LoraSpec(rank=4, seed=9), perturb=11)
    before = params_of(trainer, name)
    for p in trainer._adapter(name).params.values():
        p.grad = torch.zeros_like(p)
    trainer.optim_step(name, AdamConfig(learning_rate=0.1, weight_decay=0.5, eps=1e-8))
    after = params_of(trainer, name)
    for key in before:
        torch.testing.assert_close(after[key], before[key] * (1 - 0.1 * 0.5), atol=1e-8, rtol=1e-6)


# ----- (f) checkpoints -------------------------------------------------------------------------
ADAM_F = AdamConfig(learning_rate=1e-3, weight_decay=0.05, grad_clip_norm=5.0)
SPEC_F = LoraSpec(rank=4, seed=11, alpha=16.0)


@pytest.fixture
def trained_checkpoint(trainer: LoraTrainer, make, tmp_path: Path):
    """An adapter trained two steps and saved with its optimizer, then trained a third step.
    Returns (folder, weights at save time, weights after the uninterrupted third step, adapter)."""
    name = make(SPEC_F, perturb=12)
    for seed in (60, 61):
        fb(trainer, name, ce_batch(seed))
        trainer.optim_step(name, ADAM_F)
    saved = params_of(trainer, name)
    folder = tmp_path / "ckpt"
    size = trainer.save(name, folder, with_optimizer=True)
    assert size == sum(p.stat().st_size for p in folder.iterdir()) > 0
    assert {p.name for p in folder.iterdir()} == {
        files.WEIGHTS_FILE, files.CONFIG_FILE, files.OPTIMIZER_FILE, files.META_FILE
    }
    meta = json.loads((folder / files.META_FILE).read_text())
    assert meta["has_optimizer"] is True and meta["base_model"] == INFO.name
    fb(trainer, name, ce_batch(62))
    trainer.optim_step(name, ADAM_F)
    return folder, saved, params_of(trainer, name), name


def test_load_with_optimizer_resumes_bit_exactly(trainer: LoraTrainer, make, names, trained_checkpoint) -> None:
    folder, saved, uninterrupted, _ = trained_checkpoint
    existing = make(SPEC_F, perturb=99)  # different weights before the load
    fb(trainer, existing, ce_batch(63))  # pending gradients must not survive the load
    created = names()
    assert not trainer.has_adapter(created)
    for target in (existing, created):
        assert trainer.load(target, folder, with_optimizer=True) == SPEC_F
        assert trainer.adapter_spec(target) == SPEC_F
        assert_same(params_of(trainer, target), saved)
        assert all(g is None for g in grads_of(trainer, target).values())
        fb(trainer, target, ce_batch(62))
        trainer.optim_step(target, ADAM_F)
        assert_same(params_of(trainer, target), uninterrupted)


def test_load_without_optimizer_restarts_adam(trainer: LoraTrainer, names, trained_checkpoint) -> None:
    folder, saved, uninterrupted, original = trained_checkpoint
    for target in (names(), original):  # a new adapter, and one that has optimizer state
        trainer.load(target, folder, with_optimizer=False)
        assert_same(params_of(trainer, target), saved)
        assert opt_state_of(trainer, target) == {}
        fb(trainer, target, ce_batch(62))
        keys, grads = list(saved), grads_of(trainer, target)
        ref = [saved[k].clone().requires_grad_(True) for k in keys]
        for r, k in zip(ref, keys):
            r.grad = grads[k].clone()
        torch.nn.utils.clip_grad_norm_(ref, ADAM_F.grad_clip_norm)
        torch.optim.AdamW(
            ref, lr=ADAM_F.learning_rate, betas=(ADAM_F.beta1, ADAM_F.beta2), eps=ADAM_F.eps,
            weight_decay=ADAM_F.weight_decay,
        ).step()
        trainer.optim_step(target, ADAM_F)
        after = params_of(trainer, target)
        assert max_diff(after, dict(zip(keys, (r.detach() for r in ref)))) <= 1e-7
        assert max_diff(after, uninterrupted) > 1e-5  # restored moments would have given this


def test_save_without_optimizer_and_before_any_step(trainer: LoraTrainer, make, names, tmp_path: Path) -> None:
    name = make(SPEC_F, perturb=13)
    trainer.save(name, tmp_path / "fresh", with_optimizer=True)  # no step yet: an empty optimizer state
    assert json.loads((tmp_path / "fresh" / files.META_FILE).read_text())["has_optimizer"] is True
    assert files.load_tensors(tmp_path / "fresh" / files.OPTIMIZER_FILE) == {}
    fresh = names()
    trainer.load(fresh, tmp_path / "fresh", with_optimizer=True)  # loads, and Adam starts afresh
    assert trainer._adapter(fresh).optimizer is not None and not trainer._adapter(fresh).optimizer.state
    fb(trainer, name, ce_batch(64))
    trainer.optim_step(name, ADAM_F)
    trainer.save(name, tmp_path / "weights-only", with_optimizer=False)
    assert not (tmp_path / "weights-only" / files.OPTIMIZER_FILE).exists()
    assert files.read_spec(tmp_path / "weights-only") == SPEC_F
    other = names()
    trainer.load(other, tmp_path / "weights-only", with_optimizer=False)
    assert_same(params_of(trainer, other), params_of(trainer, name))
    # Saving over an existing checkpoint replaces it.
    trainer.save(name, tmp_path / "fresh", with_optimizer=True)
    assert json.loads((tmp_path / "fresh" / files.META_FILE).read_text())["has_optimizer"] is True


def test_load_accepts_a_checkpoint_with_another_init_seed(trainer: LoraTrainer, make, tmp_path: Path) -> None:
    """load_state into a client created with the same LoRA shape: the init seed is irrelevant once
    weights are loaded (the server draws a random seed when the client gives none)."""
    source = make(LoraSpec(rank=4, seed=21), perturb=14)
    trainer.save(source, tmp_path / "c", with_optimizer=False)
    target = make(LoraSpec(rank=4, seed=22), perturb=15)
    trainer.load(target, tmp_path / "c", with_optimizer=False)
    assert_same(params_of(trainer, target), params_of(trainer, source))


# ----- (g) load errors -------------------------------------------------------------------------
def _snapshot(trainer: LoraTrainer, name: str):
    return params_of(trainer, name), grads_of(trainer, name), opt_state_of(trainer, name)


def _assert_load_fails(trainer, names, make, folder, exc, *, with_optimizer=False, spec=SPEC_F, match=None):
    """The load raises `exc`, creates nothing for a new name and leaves an existing adapter as it was."""
    new = names()
    with pytest.raises(exc, match=match):
        trainer.load(new, folder, with_optimizer=with_optimizer)
    assert not trainer.has_adapter(new)
    existing = make(spec, perturb=16)
    fb(trainer, existing, ce_batch(70))
    trainer.optim_step(existing, ADAM_F)
    fb(trainer, existing, ce_batch(71))
    before = _snapshot(trainer, existing)
    with pytest.raises(exc, match=match):
        trainer.load(existing, folder, with_optimizer=with_optimizer)
    after = _snapshot(trainer, existing)
    for a, b in zip(before, after):
        assert_same(a, b)


@pytest.fixture
def checkpoint(trainer: LoraTrainer, make, tmp_path: Path) -> Path:
    name = make(SPEC_F, perturb=17)
    fb(trainer, name, ce_batch(72))
    trainer.optim_step(name, ADAM_F)
    trainer.save(name, tmp_path / "good", with_optimizer=True)
    return tmp_path / "good"


def _copy(folder: Path, tmp_path: Path, label: str) -> Path:
    dest = tmp_path / label
    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize(
    "other",
    [
        LoraSpec(rank=8, seed=11, alpha=16.0),
        LoraSpec(rank=4, seed=11, alpha=16.0, train_mlp=False),
        LoraSpec(rank=4, seed=11, alpha=16.0, train_unembed=False),
        LoraSpec(rank=4, seed=11, alpha=32.0),
    ],
    ids=["rank", "mlp", "unembed", "alpha"],
)
def test_load_rejects_mismatched_lora_spec(trainer: LoraTrainer, make, checkpoint: Path, other: LoraSpec) -> None:
    existing = make(other, perturb=18)
    before = params_of(trainer, existing)
    with pytest.raises(AdapterError):
        trainer.load(existing, checkpoint, with_optimizer=False)
    assert trainer.adapter_spec(existing) == other
    assert_same(params_of(trainer, existing), before)


def test_load_rejects_checkpoint_of_another_base_model(trainer, make, names, checkpoint, tmp_path) -> None:
    folder = _copy(checkpoint, tmp_path, "other-base")
    meta = json.loads((folder / files.META_FILE).read_text())
    meta["base_model"] = "Qwen/Qwen3-8B"
    (folder / files.META_FILE).write_text(json.dumps(meta))
    _assert_load_fails(trainer, names, make, folder, AdapterError, match="base model")


def test_load_with_optimizer_when_none_saved(trainer, make, names, tmp_path) -> None:
    source = make(SPEC_F, perturb=19)
    trainer.save(source, tmp_path / "no-opt", with_optimizer=False)
    _assert_load_fails(trainer, names, make, tmp_path / "no-opt", AdapterError, with_optimizer=True, match="optimizer")


def _drop_meta(f: Path) -> None:
    (f / files.META_FILE).unlink()


def _garble_meta(f: Path) -> None:
    (f / files.META_FILE).write_text("{not json")


def _future_format(f: Path) -> None:
    meta = json.loads((f / files.META_FILE).read_text())
    meta["format"] = 99
    (f / files.META_FILE).write_text(json.dumps(meta))


def _truncate_weights(f: Path) -> None:
    data = (f / files.WEIGHTS_FILE).read_bytes()
    (f / files.WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _drop_weights(f: Path) -> None:
    (f / files.WEIGHTS_FILE).unlink()


def _truncate_optimizer(f: Path) -> None:
    data = (f / files.OPTIMIZER_FILE).read_bytes()
    (f / files.OPTIMIZER_FILE).write_bytes(data[:100])


def _optimizer_missing_slot(f: Path) -> None:
    state = load_file(str(f / files.OPTIMIZER_FILE))
    state.pop(next(k for k in sorted(state) if k.startswith("exp_avg_sq/")))
    save_file(state, str(f / files.OPTIMIZER_FILE))


def _optimizer_wrong_shape(f: Path) -> None:
    state = load_file(str(f / files.OPTIMIZER_FILE))
    key = next(k for k in sorted(state) if k.startswith("exp_avg/"))
    state[key] = torch.zeros(3, 3)
    save_file(state, str(f / files.OPTIMIZER_FILE))


def _missing_tensor(f: Path) -> None:
    state = load_file(str(f / files.WEIGHTS_FILE))
    state.pop(sorted(state)[0])
    save_file(state, str(f / files.WEIGHTS_FILE))


def _extra_tensor(f: Path) -> None:
    state = load_file(str(f / files.WEIGHTS_FILE))
    state["base_model.model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(4, 4)
    save_file(state, str(f / files.WEIGHTS_FILE))


def _wrong_shape(f: Path) -> None:
    state = load_file(str(f / files.WEIGHTS_FILE))
    key = next(k for k in sorted(state) if ".lora_A." in k)
    state[key] = torch.zeros(8, state[key].shape[1])
    save_file(state, str(f / files.WEIGHTS_FILE))


DAMAGE = {
    "no-meta": (_drop_meta, CheckpointFormatError, False),
    "garbled-meta": (_garble_meta, CheckpointFormatError, False),
    "future-format": (_future_format, CheckpointFormatError, False),
    "truncated-weights": (_truncate_weights, CheckpointFormatError, False),
    "no-weights": (_drop_weights, CheckpointFormatError, False),
    "truncated-optimizer": (_truncate_optimizer, CheckpointFormatError, True),
    "optimizer-missing-slot": (_optimizer_missing_slot, CheckpointFormatError, True),
    "optimizer-wrong-shape": (_optimizer_wrong_shape, CheckpointFormatError, True),
    "missing-tensor": (_missing_tensor, (AdapterError, CheckpointFormatError), False),
    "extra-tensor": (_extra_tensor, (AdapterError, CheckpointFormatError), False),
    "wrong-shape": (_wrong_shape, (AdapterError, CheckpointFormatError), False),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_load_rejects_damaged_folder(trainer, make, names, checkpoint, tmp_path, damage: str) -> None:
    spoil, exc, with_optimizer = DAMAGE[damage]
    folder = _copy(checkpoint, tmp_path, damage)
    spoil(folder)
    _assert_load_fails(trainer, names, make, folder, exc, with_optimizer=with_optimizer)


def test_load_of_missing_folder(trainer: LoraTrainer, names, tmp_path: Path) -> None:
    new = names()
    with pytest.raises(CheckpointFormatError):
        trainer.load(new, tmp_path / "nowhere", with_optimizer=False)
    assert not trainer.has_adapter(new)


# ----- (h) the checkpoint is a plain peft adapter ----------------------------------------------
@pytest.mark.parametrize(
    "spec",
    [LoraSpec(rank=4, seed=12), LoraSpec(rank=2, seed=13, alpha=8.0, train_mlp=False, train_unembed=False)],
    ids=["all-layers", "attn-only"],
)
def test_checkpoint_loads_with_plain_peft(trainer, make, tiny_model_dir, tmp_path, spec: LoraSpec) -> None:
    name = make(spec, perturb=20)
    fb(trainer, name, ce_batch(80))
    trainer.optim_step(name, AdamConfig(learning_rate=1e-2))
    trainer.save(name, tmp_path / "peft", with_optimizer=True)

    with warnings.catch_warnings():  # plain peft warns about the tied lm_head, as expected
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        plain = PeftModel.from_pretrained(load_base_model(tiny_model_dir), str(tmp_path / "peft"))
    plain.eval()
    ids = torch.tensor([[5, 17, 300, 2999, 42, 7, 1024, 11]])
    with torch.no_grad():
        got = plain(input_ids=ids).logits
        with trainer.using(name) as model:
            want = model(input_ids=ids).logits
        with trainer.using(None) as model:
            base = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert float((want - base).abs().max()) > 1e-3  # the adapter does change the output


# ----- (i) forward only ------------------------------------------------------------------------
def test_forward_only_leaves_no_gradients(trainer: LoraTrainer, make) -> None:
    name = make(LoraSpec(rank=4, seed=14), perturb=21)
    batch = ce_batch(90, (3, 8))
    fo = fb(trainer, name, batch, forward_only=True)
    assert all(g is None for g in grads_of(trainer, name).values())
    full = fb(trainer, name, batch)
    assert fo.metrics["loss:sum"] == pytest.approx(full.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(fo.outputs, full.outputs):
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-6, rtol=0)
    pending = grads_of(trainer, name)
    assert all(g is not None for g in pending.values())
    fb(trainer, name, ce_batch(91), forward_only=True)
    fb(trainer, name, [is_datum(np.random.default_rng(92), 5)], loss=IS, forward_only=True)
    assert_same(grads_of(trainer, name), pending)


def test_metric_keys_have_one_colon(trainer: LoraTrainer, make) -> None:
    """The SDK splits every metric key into exactly (name, reduction)."""
    name = make(LoraSpec(rank=4, seed=15), perturb=22)
    res = fb(trainer, name, ce_batch(93))
    step = trainer.optim_step(name, AdamConfig())
    for key in (*res.metrics, *step):
        assert len(key.split(":")) == 2 and key.split(":")[1] in {"sum", "mean", "min", "max"}, key
