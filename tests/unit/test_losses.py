"""Tinker's built-in losses (workers/losses.py) against plain numpy references on hand-made inputs.

The bodies get padded [B, T] tensors; padded positions carry deliberately poisonous values
(huge logprobs, huge advantages) so that any leak of padding into a value or a gradient shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.losses import LOSSES, get_loss

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


def _ce_reference(lp: np.ndarray, w: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-datum loss Σ −lp·w over real positions, and d(total)/d(lp)."""
    lp64, w64 = lp.astype(np.float64), w.astype(np.float64)
    per = np.array([-(lp64[i, :n] * w64[i, :n]).sum() for i, n in enumerate(LENGTHS)])
    grad = np.where(mask > 0, -w64, 0.0)
    return per, grad


def _is_reference(lp: np.ndarray, slp: np.ndarray, adv: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-datum loss −Σ exp(lp − sampler_lp)·A over real positions, and d(total)/d(lp)."""
    per, grad = [], np.zeros(lp.shape)
    for i, n in enumerate(LENGTHS):
        ratio = np.exp(lp[i, :n].astype(np.float64) - slp[i, :n].astype(np.float64))
        per.append(-(ratio * adv[i, :n]).sum())
        grad[i, :n] = -ratio * adv[i, :n]
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


def test_registry_names_and_inputs() -> None:
    assert set(LOSSES) >= {"cross_entropy", "importance_sampling"}
    ce = get_loss("cross_entropy")
    assert ce.required_inputs == ("target_tokens",)
    assert ce.optional_inputs == {"weights": 1.0}  # weights absent -> every token counts once
    is_ = get_loss("importance_sampling")
    assert set(is_.required_inputs) == {"target_tokens", "logprobs", "advantages"}
    assert get_loss("no_such_loss") is None


def test_cross_entropy_matches_numpy_with_negative_weights_and_padding() -> None:
    per, grad = _run("cross_entropy", {"weights": WEIGHTS})
    ref_per, ref_grad = _ce_reference(LP, WEIGHTS, MASK)
    np.testing.assert_allclose(per, ref_per, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
    # Hand-computed datum 0: -(−0.5·1 + −1.25·−2 + −2·0.5 + −0.125·0) = −1.0
    assert per[0] == pytest.approx(-1.0, abs=1e-6)
    # A negative weight pushes the logprob down: the gradient of the loss is positive there.
    assert grad[0, 1] == pytest.approx(2.0)
    assert grad[1, 0] == pytest.approx(1.0)
    # Padding contributes neither value nor gradient, whatever it holds.
    assert np.all(grad[MASK == 0] == 0.0)


def test_cross_entropy_padding_values_do_not_matter() -> None:
    garbage = LP.copy()
    garbage[MASK == 0] = -1e30
    w = WEIGHTS.copy()
    w[MASK == 0] = 7.0  # nonzero weights in padding must still be masked out
    per, grad = _run("cross_entropy", {"weights": w}, lp=garbage)
    ref_per, _ = _ce_reference(LP, WEIGHTS, MASK)
    np.testing.assert_allclose(per, ref_per, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(grad)) and np.all(grad[MASK == 0] == 0.0)


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


def test_importance_sampling_matches_numpy_with_negative_advantages_and_padding() -> None:
    per, grad = _run("importance_sampling", {"logprobs": SAMPLER_LP, "advantages": ADVANTAGES})
    ref_per, ref_grad = _is_reference(LP, SAMPLER_LP, ADVANTAGES, MASK)
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(per, ref_per, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-6, atol=1e-7)
    assert np.all(grad[MASK == 0] == 0.0)
    # Hand-computed datum 1: −(exp(−0.5)·−2 + exp(0.25)·1)
    assert per[1] == pytest.approx(2 * np.exp(-0.5) - np.exp(0.25), rel=1e-6)


def test_importance_sampling_on_policy_ratio_is_one() -> None:
    """On-policy (lp == sampler lp) the loss is −Σ A and the gradient is −A (REINFORCE)."""
    per, grad = _run("importance_sampling", {"logprobs": LP, "advantages": ADVANTAGES})
    ref = [-(ADVANTAGES[i, :n].astype(np.float64)).sum() for i, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(per, ref, rtol=1e-6)
    np.testing.assert_allclose(grad, np.where(MASK > 0, -ADVANTAGES, 0.0), rtol=1e-6)
