"""Tinker's built-in losses (workers/losses.py) against plain numpy references on hand-made inputs.

The references below are written from the loss pages of
https://tinker-docs.thinkingmachines.ai/tinker/losses/ (cross-entropy, importance-sampling, ppo,
cispo, dro, gspo), per datum, in float64, with analytic gradients w.r.t. the learner's logprobs.
Where a loss's gradient is the derivative of its value (cross_entropy, importance_sampling, ppo,
dro) the analytic gradient is itself checked against finite differences; cispo and gspo define
their gradient through stop-gradients, so their references spell it out from the docs.

The bodies get padded [B, T] tensors; padded positions carry deliberately poisonous values
(huge logprobs, huge advantages, NaN and -inf) so that any leak of padding into a value or a
gradient shows. The last section runs every loss through LoraTrainer.forward_backward on the real
tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from schemas.wire import DatumIn, ForwardBackwardCall
from server.errors import InvalidRequest
from server.ops.validation import check_forward_backward
from workers.losses import LOSSES, get_loss
from workers.types import BaseModelInfo, LoraSpec

# Three datums of lengths 4, 2 and 3, padded to T = 4.
LENGTHS = [4, 2, 3]
MASK = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.float32)
LP = np.array(
    [
        [-0.5, -1.25, -2.0, -0.125],
        [-3.0, -0.75, 50.0, 80.0],  # padding: positive "logprobs" that would explode under exp
        [-1.5, -0.25, -4.0, 90.0],
    ],
    dtype=np.float32,
)
WEIGHTS = np.array(
    [
        [1.0, -2.0, 0.5, 0.0],
        [-1.0, 3.0, 0.0, 0.0],
        [0.25, 1.0, -0.5, 0.0],
    ],
    dtype=np.float32,
)
# Log-ratios lp − sampler_lp on real positions: [.25, −.25, .5, .125], [−.5, .25], [−.5, .25, −.5],
# i.e. ratios 1.284, 0.779, 1.649, 1.133 | 0.607, 1.284 | 0.607, 1.284, 0.607.
SAMPLER_LP = np.array(
    [
        [-0.75, -1.0, -2.5, -0.25],
        [-2.5, -1.0, -500.0, -900.0],  # padding: exp(lp - sampler_lp) would overflow to inf
        [-1.0, -0.5, -3.5, -700.0],
    ],
    dtype=np.float32,
)
ADVANTAGES = np.array(
    [
        [0.5, 0.5, -1.5, 2.0],
        [-2.0, 1.0, 1e6, -1e6],  # padding: huge advantages
        [1.0, -0.25, 0.75, 1e6],
    ],
    dtype=np.float32,
)
# GSPO: datum 0 leaves its first ("prompt") token out of the ratio; datum 1 marks tokens with
# values other than 1 (any nonzero value counts, unweighted) and marks its padding (ignored);
# datum 2 marks none of its real tokens (the ratio is then 1) but marks its padding.
SEQ_RATIO_MASK = np.array(
    [
        [0.0, 1.0, 1.0, 1.0],
        [2.0, -1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 1.0],
    ],
    dtype=np.float32,
)
RL = {"logprobs": SAMPLER_LP, "advantages": ADVANTAGES}
INPUTS = {
    "cross_entropy": {"weights": WEIGHTS},
    "importance_sampling": RL,
    "ppo": RL,
    "cispo": RL,
    "dro": RL,
    "gspo": {**RL, "sequence_ratio_mask": SEQ_RATIO_MASK},
}

Ref = Callable[[np.ndarray, dict[str, np.ndarray], dict[str, float]], tuple[float, np.ndarray]]


# ----- numpy references: one datum, 1-D float64 arrays, -> (loss, d loss / d lp) -----------------
def ref_cross_entropy(lp, x, cfg):
    w = x["weights"]
    return -(lp * w).sum(), -w


def ref_importance_sampling(lp, x, cfg):
    r, a = np.exp(lp - x["logprobs"]), x["advantages"]
    return -(r * a).sum(), -r * a


def _clipped_objective(r: np.ndarray, a: np.ndarray, lo: float, hi: float) -> tuple[float, np.ndarray]:
    """−Σ min(r·A, clip(r, lo, hi)·A) and its gradient, given d r_t / d lp_t = r_t.

    Where the unclipped term is the smaller (or they tie, i.e. r is inside the bounds) the
    gradient is −r·A; where the clipped term wins, r lies outside the bounds and it is 0."""
    unclipped, clipped = r * a, np.clip(r, lo, hi) * a
    return -np.minimum(unclipped, clipped).sum(), np.where(unclipped <= clipped, -r * a, 0.0)


def ref_ppo(lp, x, cfg):
    r = np.exp(lp - x["logprobs"])
    return _clipped_objective(r, x["advantages"], cfg["clip_low_threshold"], cfg["clip_high_threshold"])


def ref_cispo(lp, x, cfg):
    c = np.clip(np.exp(lp - x["logprobs"]), cfg["clip_low_threshold"], cfg["clip_high_threshold"])
    a = x["advantages"]
    return -(c * lp * a).sum(), -c * a  # the clipped ratio is a constant (stop-gradient)


def ref_dro(lp, x, cfg):
    d, a, beta = lp - x["logprobs"], x["advantages"], cfg["beta"]
    return -(lp * a - 0.5 * beta * d**2).sum(), -(a - beta * d)


def ref_gspo(lp, x, cfg):
    """GSPO-token: every token's ratio has the value s = exp(mean over the marked tokens of
    lp − sampler_lp) and d ratio_t / d lp_t = s (its own logprob only)."""
    marked = x["sequence_ratio_mask"] != 0
    s = np.exp((lp - x["logprobs"])[marked].mean()) if marked.any() else 1.0
    r = np.full(lp.shape, s)
    return _clipped_objective(r, x["advantages"], cfg["clip_low_threshold"], cfg["clip_high_threshold"])


REFS: dict[str, Ref] = {
    "cross_entropy": ref_cross_entropy,
    "importance_sampling": ref_importance_sampling,
    "ppo": ref_ppo,
    "cispo": ref_cispo,
    "dro": ref_dro,
    "gspo": ref_gspo,
}


def reference(name: str, lp: np.ndarray, inputs: dict[str, np.ndarray], config: dict | None = None):
    """Per-datum losses and the [B, T] gradient (0 on padding) of the padded test batch."""
    cfg = {**get_loss(name).config_defaults, **(config or {})}
    per, grad = [], np.zeros(lp.shape)
    for i, n in enumerate(LENGTHS):
        x = {k: v[i, :n].astype(np.float64) for k, v in inputs.items()}
        value, g = REFS[name](lp[i, :n].astype(np.float64), x, cfg)
        per.append(value)
        grad[i, :n] = g
    return np.array(per), grad


def _run(name: str, inputs: dict[str, np.ndarray], lp: np.ndarray = LP, config: dict | None = None):
    loss = get_loss(name)
    assert loss is not None
    lp_t = torch.tensor(lp, requires_grad=True)
    x = {k: torch.tensor(v) for k, v in inputs.items()}
    per = loss.body(lp_t, x, torch.tensor(MASK), {**loss.config_defaults, **(config or {})})
    assert per.shape == (len(LENGTHS),)
    per.sum().backward()
    return per.detach().numpy().astype(np.float64), lp_t.grad.numpy().astype(np.float64)


# ----- registry --------------------------------------------------------------------------------
def test_registry_names_inputs_and_defaults() -> None:
    assert set(LOSSES) >= set(REFS)
    assert "stable_reinforce" not in LOSSES  # not offered: see workers/losses.py
    ce = get_loss("cross_entropy")
    assert ce.required_inputs == ("target_tokens",)
    assert ce.optional_inputs == {"weights": 1.0}  # weights absent -> every token counts once
    assert ce.config_defaults == {}
    for name in ("importance_sampling", "ppo", "cispo", "dro"):
        assert set(get_loss(name).required_inputs) == {"target_tokens", "logprobs", "advantages"}, name
        assert get_loss(name).optional_inputs == {}, name
    assert set(get_loss("gspo").required_inputs) == {"target_tokens", "logprobs", "advantages", "sequence_ratio_mask"}
    assert get_loss("importance_sampling").config_defaults == {}
    assert get_loss("ppo").config_defaults == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert get_loss("cispo").config_defaults == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert get_loss("dro").config_defaults == {"beta": 0.05}
    assert get_loss("gspo").config_defaults == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    for name, loss in LOSSES.items():
        assert loss.name == name
    assert get_loss("no_such_loss") is None


# ----- the references themselves ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name,config",
    [
        ("cross_entropy", None),
        ("importance_sampling", None),
        ("ppo", None),
        ("ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}),
        ("dro", {"beta": 0.5}),
    ],
)
def test_reference_gradients_match_finite_differences(name: str, config: dict | None) -> None:
    """Where the gradient is the derivative of the value, the analytic reference agrees with
    central differences (the test inputs keep every ratio away from the clip kinks)."""
    cfg = {**get_loss(name).config_defaults, **(config or {})}
    h = 1e-6
    for i, n in enumerate(LENGTHS):
        lp = LP[i, :n].astype(np.float64)
        x = {k: v[i, :n].astype(np.float64) for k, v in INPUTS[name].items()}
        _, grad = REFS[name](lp, x, cfg)
        fd = np.array(
            [(REFS[name](lp + h * e, x, cfg)[0] - REFS[name](lp - h * e, x, cfg)[0]) / (2 * h) for e in np.eye(n)]
        )
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)


# ----- every loss against its reference ---------------------------------------------------------
CASES = [
    ("cross_entropy", None),
    ("importance_sampling", None),
    ("ppo", None),
    ("ppo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3}),
    ("cispo", None),
    ("cispo", {"clip_low_threshold": 0.7, "clip_high_threshold": 1.25}),
    ("dro", None),
    ("dro", {"beta": 0.5}),
    ("gspo", None),
    ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
]


@pytest.mark.parametrize("name,config", CASES)
def test_loss_matches_numpy_reference(name: str, config: dict | None) -> None:
    per, grad = _run(name, INPUTS[name], config=config)
    ref_per, ref_grad = reference(name, LP, INPUTS[name], config)
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(per, ref_per, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert np.all(grad[MASK == 0] == 0.0)


@pytest.mark.parametrize("name,config", CASES)
@pytest.mark.parametrize("poison", [np.nan, -np.inf, np.inf, -1e30])
def test_padding_values_never_leak(name: str, config: dict | None, poison: float) -> None:
    lp = LP.copy()
    lp[MASK == 0] = poison
    inputs = {k: v.copy() for k, v in INPUTS[name].items()}
    for key, v in inputs.items():
        v[MASK == 0] = -poison if key == "logprobs" else poison
    per, grad = _run(name, inputs, lp=lp, config=config)
    ref_per, _ = reference(name, LP, INPUTS[name], config)
    np.testing.assert_allclose(per, ref_per, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[MASK == 0] == 0.0)


# ----- cross_entropy ----------------------------------------------------------------------------
def test_cross_entropy_hand_values() -> None:
    per, grad = _run("cross_entropy", {"weights": WEIGHTS})
    # Datum 0: -(−0.5·1 + −1.25·−2 + −2·0.5 + −0.125·0) = −1.0
    assert per[0] == pytest.approx(-1.0, abs=1e-6)
    # A negative weight pushes the logprob down: the gradient of the loss is positive there.
    assert grad[0, 1] == pytest.approx(2.0)
    assert grad[1, 0] == pytest.approx(1.0)


def test_cross_entropy_sum_reduction_no_mean() -> None:
    """Doubling every weight doubles the loss; splitting the batch sums up (no normalisation)."""
    per1, _ = _run("cross_entropy", {"weights": WEIGHTS})
    per2, _ = _run("cross_entropy", {"weights": 2 * WEIGHTS})
    np.testing.assert_allclose(per2, 2 * per1, rtol=1e-6)
    ones = np.where(MASK > 0, 1.0, 0.0).astype(np.float32)
    per_ones, _ = _run("cross_entropy", {"weights": ones})
    # With unit weights the loss is the plain sum of −logprobs (not the mean over tokens).
    plain_sum = [-(LP[i, :n].astype(np.float64)).sum() for i, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(per_ones, plain_sum, rtol=1e-6)


# ----- importance_sampling ----------------------------------------------------------------------
def test_importance_sampling_hand_values() -> None:
    per, _ = _run("importance_sampling", RL)
    # Datum 1: −(exp(−0.5)·−2 + exp(0.25)·1)
    assert per[1] == pytest.approx(2 * np.exp(-0.5) - np.exp(0.25), rel=1e-6)


def test_importance_sampling_on_policy_ratio_is_one() -> None:
    """On-policy (lp == sampler lp) the loss is −Σ A and the gradient is −A (REINFORCE)."""
    per, grad = _run("importance_sampling", {"logprobs": LP, "advantages": ADVANTAGES})
    ref = [-(ADVANTAGES[i, :n].astype(np.float64)).sum() for i, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(per, ref, rtol=1e-6)
    np.testing.assert_allclose(grad, np.where(MASK > 0, -ADVANTAGES, 0.0), rtol=1e-6)


# ----- ppo --------------------------------------------------------------------------------------
def test_ppo_clipping_cases_with_default_thresholds() -> None:
    """Default bounds 0.8 / 1.2 (ε = 0.2): the inputs cover each branch of the min."""
    per, grad = _run("ppo", RL)
    r = np.exp(np.where(MASK > 0, LP.astype(np.float64) - SAMPLER_LP, 0.0))
    # Above 1.2 with A > 0: the clipped term 1.2·A wins, no gradient.
    assert r[0, 0] > 1.2 and ADVANTAGES[0, 0] > 0 and grad[0, 0] == 0.0
    assert r[1, 1] > 1.2 and ADVANTAGES[1, 1] > 0 and grad[1, 1] == 0.0
    # Below 0.8 with A < 0: the clipped term 0.8·A wins, no gradient.
    assert r[1, 0] < 0.8 and ADVANTAGES[1, 0] < 0 and grad[1, 0] == 0.0
    # Outside the bounds on the pessimistic side the unclipped term stays: gradient −r·A.
    assert r[0, 2] > 1.2 and ADVANTAGES[0, 2] < 0 and grad[0, 2] == pytest.approx(-r[0, 2] * ADVANTAGES[0, 2])
    assert r[0, 1] < 0.8 and ADVANTAGES[0, 1] > 0 and grad[0, 1] == pytest.approx(-r[0, 1] * ADVANTAGES[0, 1])
    # Inside the bounds: plain importance sampling.
    assert 0.8 < r[0, 3] < 1.2 and grad[0, 3] == pytest.approx(-r[0, 3] * ADVANTAGES[0, 3])
    # Datum 1 by hand: −(min(0.607·−2, 0.8·−2) + min(1.284·1, 1.2·1)) = 1.6 − 1.2
    assert per[1] == pytest.approx(1.6 - 1.2, rel=1e-6)


def test_ppo_thresholds_are_absolute_ratio_bounds() -> None:
    """Config values are the clamp bounds themselves, not ε."""
    wide, _ = _run("ppo", RL, config={"clip_low_threshold": 0.0, "clip_high_threshold": 1e9})
    is_, _ = _run("importance_sampling", RL)
    np.testing.assert_allclose(wide, is_, rtol=1e-6)  # nothing clipped: importance sampling
    tight, grad = _run("ppo", RL, config={"clip_low_threshold": 1.0, "clip_high_threshold": 1.0})
    # Datum 1 with both bounds at 1: −(min(0.607·−2, −2) + min(1.284, 1)) = 2 − 1
    assert tight[1] == pytest.approx(1.0, rel=1e-6)
    assert grad[1, 0] == 0.0 and grad[1, 1] == 0.0


# ----- cispo ------------------------------------------------------------------------------------
def test_cispo_default_is_one_sided() -> None:
    """Defaults 0 / 4: no lower bound, the coefficient is capped at 4."""
    lp = np.array([[-1.0, -1.0, -1.0, -1.0]] * 3, dtype=np.float32)
    slp = np.array([[-3.0, -1.0 + np.log(100.0), -1.5, -1.0]] * 3, dtype=np.float32)  # ratios e², 0.01, e^.5, 1
    adv = np.array([[1.0, -2.0, 0.5, 3.0]] * 3, dtype=np.float32)
    _, grad = _run("cispo", {"logprobs": slp, "advantages": adv}, lp=lp)
    np.testing.assert_allclose(grad[0], [-4.0 * 1.0, -0.01 * -2.0, -np.exp(0.5) * 0.5, -1.0 * 3.0], rtol=1e-5)


def test_cispo_gradient_is_clipped_ratio_times_advantage() -> None:
    cfg = {"clip_low_threshold": 0.7, "clip_high_threshold": 1.25}
    per, grad = _run("cispo", RL, config=cfg)
    # Datum 1: ratios 0.607 -> 0.7 and 1.284 -> 1.25; the ratio itself carries no gradient.
    assert grad[1, 0] == pytest.approx(-0.7 * -2.0, rel=1e-6)
    assert grad[1, 1] == pytest.approx(-1.25 * 1.0, rel=1e-6)
    assert per[1] == pytest.approx(-(0.7 * -3.0 * -2.0 + 1.25 * -0.75 * 1.0), rel=1e-6)


# ----- dro --------------------------------------------------------------------------------------
def test_dro_hand_values() -> None:
    per, grad = _run("dro", RL, config={"beta": 0.5})
    # Datum 1: −[(−3·−2 − ½·0.5·0.25) + (−0.75·1 − ½·0.5·0.0625)]
    assert per[1] == pytest.approx(-((6.0 - 0.0625) + (-0.75 - 0.015625)), rel=1e-6)
    # d/d lp of −(lp·A − ½β(lp − q)²) = −A + β(lp − q)
    assert grad[1, 0] == pytest.approx(2.0 + 0.5 * -0.5, rel=1e-6)
    _, g0 = _run("dro", RL, config={"beta": 0.0})
    np.testing.assert_allclose(g0, np.where(MASK > 0, -ADVANTAGES, 0.0), rtol=1e-6)  # plain −lp·A


# ----- gspo -------------------------------------------------------------------------------------
def test_gspo_sequence_ratio_value_and_token_gradients() -> None:
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    per, grad = _run("gspo", INPUTS["gspo"], config=cfg)
    s0 = np.exp(np.mean([-0.25, 0.5, 0.125]))  # token 0 is not in datum 0's ratio
    s1 = np.exp(np.mean([-0.5, 0.25]))  # values 2 and −1 count like 1; the marked padding does not
    assert s0 > 1.1 and s1 < 0.9
    # Datum 0, s above the bound: tokens with A > 0 are clipped (no gradient); the one with A < 0
    # keeps −s·A. Token 0, outside the ratio's mask, still takes part with the sequence's ratio.
    assert grad[0, 0] == 0.0 and grad[0, 1] == 0.0 and grad[0, 3] == 0.0
    assert grad[0, 2] == pytest.approx(-s0 * -1.5, rel=1e-6)
    assert per[0] == pytest.approx(-(1.1 * 0.5 + 1.1 * 0.5 + s0 * -1.5 + 1.1 * 2.0), rel=1e-6)
    # Datum 1, s below the bound: A < 0 clipped at 0.9, A > 0 keeps s.
    assert grad[1, 0] == 0.0 and grad[1, 1] == pytest.approx(-s1 * 1.0, rel=1e-6)
    assert per[1] == pytest.approx(-(0.9 * -2.0 + s1 * 1.0), rel=1e-6)
    # Datum 2 marks none of its real tokens: ratio 1, i.e. −Σ A with gradient −A.
    assert per[2] == pytest.approx(-(1.0 - 0.25 + 0.75), rel=1e-6)
    np.testing.assert_allclose(grad[2, :3], -ADVANTAGES[2, :3], rtol=1e-6)


def test_gspo_on_equal_log_ratios_is_ppo() -> None:
    """When every marked token has the same log-ratio and the mask covers the datum, GSPO-token
    is token-level PPO."""
    slp = LP - 0.15
    slp[MASK == 0] = -1e4
    inputs = {"logprobs": slp, "advantages": ADVANTAGES, "sequence_ratio_mask": MASK.copy()}
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    gspo, g_gspo = _run("gspo", inputs, config=cfg)
    ppo, g_ppo = _run("ppo", {"logprobs": slp, "advantages": ADVANTAGES}, config=cfg)
    np.testing.assert_allclose(gspo, ppo, rtol=1e-5)
    np.testing.assert_allclose(g_gspo, g_ppo, rtol=1e-5, atol=1e-7)


# ----- request validation -----------------------------------------------------------------------
BASE = BaseModelInfo(name="tiny", architecture="Qwen3ForCausalLM", vocab_size=100, max_context_length=64)


def _call(loss_fn: str, inputs: dict[str, np.ndarray], config: dict | None = None) -> ForwardBackwardCall:
    datum = DatumIn(tokens=np.arange(1, 5, dtype=np.int64), loss_fn_inputs=inputs)
    return ForwardBackwardCall(
        model_id="m", seq_id=0, loss_fn=loss_fn, loss_fn_config=config or {}, forward_only=False, data=[datum]
    )


RL_DATUM = {
    "target_tokens": np.arange(2, 6, dtype=np.int64),
    "logprobs": np.full(4, -1.0, dtype=np.float32),
    "advantages": np.ones(4, dtype=np.float32),
}


def test_unoffered_loss_is_a_user_error_that_says_why() -> None:
    with pytest.raises(InvalidRequest) as exc:
        check_forward_backward(_call("stable_reinforce", RL_DATUM), BASE)
    assert exc.value.field == "loss_fn"
    assert "not offered" in exc.value.message and "not publicly documented" in exc.value.message


def test_unknown_loss_is_a_user_error_naming_the_implemented_ones() -> None:
    with pytest.raises(InvalidRequest) as exc:
        check_forward_backward(_call("no_such_loss", RL_DATUM), BASE)
    assert exc.value.field == "loss_fn"
    for name in REFS:
        assert name in exc.value.message


def test_validation_uses_each_loss_inputs_and_config_keys() -> None:
    assert check_forward_backward(_call("ppo", RL_DATUM, {"clip_low_threshold": 0.9}), BASE).name == "ppo"
    assert check_forward_backward(_call("dro", RL_DATUM, {"beta": 0.1}), BASE).name == "dro"
    with pytest.raises(InvalidRequest, match="takes no config key 'beta'"):
        check_forward_backward(_call("ppo", RL_DATUM, {"beta": 0.1}), BASE)
    with pytest.raises(InvalidRequest, match="sequence_ratio_mask"):
        check_forward_backward(_call("gspo", RL_DATUM), BASE)
    gspo = {**RL_DATUM, "sequence_ratio_mask": np.ones(4, dtype=np.float32)}
    assert check_forward_backward(_call("gspo", gspo, {"clip_high_threshold": 1.1}), BASE).name == "gspo"


# ----- through LoraTrainer.forward_backward on the real tiny model -------------------------------
VOCAB = 4096
INFO = BaseModelInfo(
    name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=VOCAB, max_context_length=4096, eos_token_ids=(2,)
)
# Per-datum log-ratios lp − sampler_lp, chosen so that token ratios fall below, inside and above
# the bounds, and that GSPO's sequence ratio is above (datum 0), below (datum 1) and inside
# (datum 2) the bounds 0.9 / 1.1.
TRAINER_DELTAS = [
    [0.4, -0.4, 0.3, 0.2, 0.35, 0.25],
    [-0.3, -0.2, -0.4],
    [0.4, -0.4, 0.05, -0.05, 0.3, -0.3, 0.1, -0.1, 0.0],
]
TRAINER_CASES = [
    ("cross_entropy", {}),
    ("importance_sampling", {}),
    ("ppo", {"clip_low_threshold": 0.75, "clip_high_threshold": 1.3}),
    ("cispo", {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    ("dro", {"beta": 0.3}),
    ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path):
    from workers.trainer import LoraTrainer, load_base_model

    return LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)


@pytest.fixture
def adapter(trainer):
    name = f"loss-{np.random.default_rng().integers(1 << 30)}"
    trainer.create_adapter(name, LoraSpec(rank=4, seed=3))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # B = 0 at init: give it values so every LoRA parameter gets a gradient
        for key, param in trainer._adapter(name).params.items():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    yield name
    trainer.remove_adapter(name)


def _trainer_batch(trainer, name: str, loss_name: str) -> list[DatumIn]:
    rng = np.random.default_rng(5)
    base = [
        DatumIn(
            tokens=rng.integers(3, VOCAB, len(d)).astype(np.int64),
            loss_fn_inputs={"target_tokens": rng.integers(3, VOCAB, len(d)).astype(np.int64)},
        )
        for d in TRAINER_DELTAS
    ]
    lps = [o["logprobs"] for o in trainer.forward_backward(name, base, get_loss("cross_entropy"), {}, True).outputs]
    data = []
    for d, lp, delta in zip(base, lps, TRAINER_DELTAS):
        n = len(delta)
        inputs = dict(d.loss_fn_inputs)
        if loss_name == "cross_entropy":
            inputs["weights"] = rng.standard_normal(n).astype(np.float32)
        else:
            inputs["logprobs"] = (lp - np.array(delta)).astype(np.float32)
            inputs["advantages"] = (rng.standard_normal(n) * np.resize([1, -1], n)).astype(np.float32)
            inputs["sequence_ratio_mask"] = np.array([0.0] + [1.0] * (n - 1), dtype=np.float32)
        data.append(DatumIn(tokens=d.tokens, loss_fn_inputs=inputs))
    return data


@pytest.mark.parametrize("loss_name,config", TRAINER_CASES)
def test_trainer_loss_sum_and_gradients_match_reference(trainer, adapter, loss_name: str, config: dict) -> None:
    data = _trainer_batch(trainer, adapter, loss_name)
    loss = get_loss(loss_name)
    res = trainer.forward_backward(adapter, data, loss, {**loss.config_defaults, **config})

    takes_sampler_logprobs = "logprobs" in loss.required_inputs  # those report sampler_logprob_gap too
    assert set(res.metrics) == {"loss:sum"} | ({"sampler_logprob_gap:mean"} if takes_sampler_logprobs else set())
    cfg = {**loss.config_defaults, **config}
    refs = []
    for out, d in zip(res.outputs, data):
        x = {k: v.astype(np.float64) for k, v in d.loss_fn_inputs.items() if k != "target_tokens"}
        refs.append(REFS[loss_name](out["logprobs"].astype(np.float64), x, cfg))
    want = sum(value for value, _ in refs)
    assert res.metrics["loss:sum"] == pytest.approx(want, rel=1e-5, abs=1e-4)

    # The LoRA gradients are those of Σ_t lp_t · (d loss / d lp_t), with lp from unpadded
    # per-datum forward passes and d loss / d lp_t from the numpy reference.
    params = trainer._adapter(adapter).params
    keys = list(params)
    expected = {k: torch.zeros_like(params[k], dtype=torch.float64) for k in keys}
    for d, (_, g) in zip(data, refs):
        with trainer.using(adapter) as model:
            logits = model(input_ids=torch.from_numpy(d.tokens)[None]).logits[0]
        targets = torch.from_numpy(d.loss_fn_inputs["target_tokens"])
        lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None])[:, 0]
        for k, gk in zip(keys, torch.autograd.grad((lp * torch.from_numpy(g)).sum(), [params[k] for k in keys])):
            expected[k] += gk
    for k in keys:
        got, want_g = params[k].grad, expected[k]
        scale = float(want_g.abs().max())
        assert scale > 0, f"{k}: reference gradient is zero, the test would be vacuous"
        torch.testing.assert_close(got, want_g.to(got.dtype), atol=1e-5 * max(scale, 1.0), rtol=1e-4)


def test_trainer_inputs_cover_the_clip_branches(trainer, adapter) -> None:
    """The trainer-level RL data really has ratios on both sides of the bounds."""
    data = _trainer_batch(trainer, adapter, "ppo")
    res = trainer.forward_backward(adapter, data, get_loss("importance_sampling"), {}, forward_only=True)
    ratios = np.concatenate([np.exp(o["logprobs"] - d.loss_fn_inputs["logprobs"]) for o, d in zip(res.outputs, data)])
    assert (ratios < 0.75).any() and (ratios > 1.3).any() and ((ratios > 0.8) & (ratios < 1.2)).any()
    seq = [np.exp(np.mean((o["logprobs"] - d.loss_fn_inputs["logprobs"])[1:])) for o, d in zip(res.outputs, data)]
    assert seq[0] > 1.1 and seq[1] < 0.9 and 0.9 < seq[2] < 1.1
