"""Every built-in loss through the unmodified SDK: `loss:sum` equals an independent numpy reference
computed from the logprobs the server returns, an optim_step moves the model, bad loss requests
are refused with a message naming the problem, and a weighted cross_entropy step equals the same
step taken through a client-side custom loss."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from tests.support.data import make_data

pytestmark = pytest.mark.slow
BASE = "tiny-qwen3"
LR = 1e-2
# For steps whose gradients are compared: with eps far above the gradients, Adam's first step is
# lr * g / (|g| + eps), close to SGD, so it depends on the gradient's scale and not only on its signs.
GRAD_STEP = types.AdamParams(learning_rate=0.5, eps=100.0)

# The defaults the server documents for each loss's loss_fn_config (README / Tinker docs).
DEFAULTS: dict[str, dict[str, float]] = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": 0.05},
    "gspo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
}

CASES = [  # (loss_fn, loss_fn_config or None for the defaults)
    ("cross_entropy", None),
    ("importance_sampling", None),
    ("ppo", None),
    ("ppo", {"clip_low_threshold": 0.5, "clip_high_threshold": 1.6}),
    ("cispo", None),
    ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ("dro", None),
    ("dro", {"beta": 0.7}),
    ("gspo", None),
    ("gspo", {"clip_low_threshold": 0.95, "clip_high_threshold": 1.05}),
]


def reference_loss(loss_fn: str, cfg: dict[str, float], logprobs: list[np.ndarray], inputs: list[dict]) -> float:
    """Tinker's loss formulas (https://tinker-docs.thinkingmachines.ai/tinker/losses/), summed over
    each datum's tokens and over datums, in float64."""
    total = 0.0
    for lp, x in zip(logprobs, inputs):
        lp = lp.astype(np.float64)
        if loss_fn == "cross_entropy":
            total += -(lp * x["weights"]).sum()
            continue
        old, adv = x["logprobs"].astype(np.float64), x["advantages"].astype(np.float64)
        ratio = np.exp(lp - old)
        if loss_fn == "importance_sampling":
            total += -(ratio * adv).sum()
        elif loss_fn == "ppo":
            clipped = np.clip(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
            total += -np.minimum(ratio * adv, clipped * adv).sum()
        elif loss_fn == "cispo":
            coef = np.clip(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
            total += -(coef * lp * adv).sum()
        elif loss_fn == "dro":
            total += -(lp * adv - 0.5 * cfg["beta"] * (lp - old) ** 2).sum()
        elif loss_fn == "gspo":
            in_ratio = x["sequence_ratio_mask"] != 0
            seq_ratio = np.exp((lp - old)[in_ratio].mean())  # one ratio for the whole sequence
            ratio = np.full_like(lp, seq_ratio)
            clipped = np.clip(ratio, cfg["clip_low_threshold"], cfg["clip_high_threshold"])
            total += -np.minimum(ratio * adv, clipped * adv).sum()
        else:
            raise AssertionError(loss_fn)
    return float(total)


def loss_inputs(loss_fn: str, rows: list[list[int]], current: list[np.ndarray], seed: int) -> list[dict]:
    """Per-datum loss_fn_inputs. RL "sampling" logprobs are the current ones plus noise and a
    per-datum offset, so ratios straddle the clip bounds; advantages have both signs."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (row, lp) in enumerate(zip(rows, current)):
        n = len(row) - 1
        x: dict[str, np.ndarray] = {"target_tokens": np.asarray(row[1:], dtype=np.int64)}
        if loss_fn == "cross_entropy":
            w = rng.uniform(-0.6, 1.0, n).astype(np.float32)  # negative and fractional weights
            w[::5] = 0.0
            x["weights"] = w
        else:
            offset = (-1.2, -0.1, 0.15, 0.35)[i % 4]
            x["logprobs"] = (lp + offset + rng.normal(0, 0.3, n)).astype(np.float32)
            x["advantages"] = rng.uniform(-0.5, 1.5, n).astype(np.float32)
            if loss_fn == "gspo":
                mask = (rng.uniform(size=n) < 0.7).astype(np.float32)
                mask[0] = 1.0
                x["sequence_ratio_mask"] = mask
        out.append(x)
    return out


def datums(rows: list[list[int]], inputs: list[dict]) -> list[types.Datum]:
    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]), loss_fn_inputs=dict(x))
            for row, x in zip(rows, inputs)]


def logprobs_of(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [out["logprobs"].to_numpy() for out in output.loss_fn_outputs]


@pytest.fixture(scope="module")
def service(server):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-losses")
    yield sc
    sc.close("success").result()


@pytest.fixture(scope="module")
def training(service):
    return service.create_lora_training_client(BASE, rank=8, seed=3).result()


@pytest.mark.parametrize(("loss_fn", "config"), CASES, ids=[f"{n}-{'custom' if c else 'default'}" for n, c in CASES])
def test_loss_sum_matches_the_reference_and_a_step_moves_the_model(training, token_rows, loss_fn, config) -> None:
    tc = training
    plain = make_data(token_rows)
    before = logprobs_of(tc.forward(plain, "cross_entropy").result())
    inputs = loss_inputs(loss_fn, token_rows, before, seed=len(loss_fn) + (7 if config else 0))
    cfg = {**DEFAULTS[loss_fn], **(config or {})}
    # Each config value must matter on this data, or matching the reference would prove nothing.
    ref = reference_loss(loss_fn, cfg, before, inputs)
    for key, value in cfg.items():
        if value == 0.0:  # cispo's default lower bound: none, so no ratio here is near it
            continue
        other = reference_loss(loss_fn, {**cfg, key: value * 1.5 + 0.05}, before, inputs)
        assert abs(other - ref) > 1e-3 * abs(ref), (loss_fn, key)

    fb = tc.forward_backward(datums(token_rows, inputs), loss_fn, config)
    opt = tc.optim_step(types.AdamParams(learning_rate=LR))
    after = logprobs_of(tc.forward(plain, "cross_entropy").result())
    out = fb.result()
    assert opt.result() is not None

    returned = logprobs_of(out)
    assert len(returned) == len(token_rows)
    for lp, row, lp_before in zip(returned, token_rows, before):
        assert lp.shape == (len(row) - 1,)
        assert np.all(np.isfinite(lp)) and np.all(lp <= 0)
        np.testing.assert_allclose(lp, lp_before, atol=1e-5, rtol=0)  # same weights as the forward
    expected = reference_loss(loss_fn, cfg, returned, inputs)
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4), (loss_fn, config)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(after, returned))
    assert moved > 1e-3, f"{loss_fn}: one optim_step left the logprobs unchanged (max change {moved})"


def rl_datum(row: list[int], **drop: bool) -> types.Datum:
    n = len(row) - 1
    x = {"target_tokens": row[1:], "logprobs": np.full(n, -1.0, np.float32), "advantages": np.ones(n, np.float32)}
    return types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                       loss_fn_inputs={k: v for k, v in x.items() if not drop.get(k)})


def user_error(err: pytest.ExceptionInfo) -> str:
    body = err.value.body
    assert isinstance(body, dict) and body.get("category") == "user", body
    return str(body["error"])


def test_ppo_without_advantages_names_the_field(training, token_rows) -> None:
    with pytest.raises(tinker.BadRequestError) as err:
        training.forward_backward([rl_datum(token_rows[0], advantages=True)], "ppo").result()
    message = user_error(err)
    assert "advantages" in message and "ppo" in message, message
    assert err.value.body.get("field") == "data[0].loss_fn_inputs.advantages"


def test_unknown_loss_config_key_names_the_key(training, token_rows) -> None:
    with pytest.raises(tinker.BadRequestError) as err:
        training.forward_backward([rl_datum(token_rows[0])], "ppo", {"clip_epsilon": 0.2}).result()
    message = user_error(err)
    assert "clip_epsilon" in message and "clip_low_threshold" in message, message  # and says what is known


def test_stable_reinforce_is_refused_as_not_offered(training, token_rows) -> None:
    with pytest.raises(tinker.BadRequestError) as err:
        training.forward_backward([rl_datum(token_rows[0])], "stable_reinforce").result()
    message = user_error(err)
    assert "stable_reinforce" in message and "not offered" in message, message
    assert "not publicly documented" in message, message  # the reason, not just a refusal
    # The refusal is a plain 400: the model still trains.
    assert training.forward(make_data(token_rows[:1]), "cross_entropy").result().loss_fn_outputs


def test_weighted_cross_entropy_step_equals_a_client_side_custom_loss_step(service, token_rows) -> None:
    rng = np.random.default_rng(21)
    weights = [rng.uniform(-0.5, 1.0, len(row) - 1).astype(np.float32) for row in token_rows]
    data = [types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                        loss_fn_inputs={"target_tokens": row[1:], "weights": w})
            for row, w in zip(token_rows, weights)]
    builtin = service.create_lora_training_client(BASE, rank=8, seed=11).result()
    custom = service.create_lora_training_client(BASE, rank=8, seed=11).result()

    def neg_weighted_logprobs(batch: list[types.Datum], logprobs: list[torch.Tensor]):
        loss = sum(-(lp * d.loss_fn_inputs["weights"].to_torch()).sum() for d, lp in zip(batch, logprobs))
        return loss, {}

    fb_builtin = builtin.forward_backward(data, "cross_entropy")
    fb_custom = custom.forward_backward_custom(data, neg_weighted_logprobs)
    opt_builtin = builtin.optim_step(GRAD_STEP)
    opt_custom = custom.optim_step(GRAD_STEP)
    assert fb_custom.result().metrics["loss:sum"] == pytest.approx(fb_builtin.result().metrics["loss:sum"], abs=1e-4)
    opt_builtin.result(), opt_custom.result()

    plain = make_data(token_rows)
    after_builtin = logprobs_of(builtin.forward(plain, "cross_entropy").result())
    after_custom = logprobs_of(custom.forward(plain, "cross_entropy").result())
    before = logprobs_of(fb_builtin.result())
    assert max(float(np.abs(a - b).max()) for a, b in zip(after_builtin, before)) > 1e-3  # it did train
    for a, b in zip(after_builtin, after_custom):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
