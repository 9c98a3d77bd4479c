"""Custom losses through the unmodified SDK: a client-side callable (`forward_backward_custom`:
a forward_only cross_entropy pass, then a backward with weights = -dL/dlogprobs), and the same
loss uploaded with `ServiceClient.create_custom_loss` and run by the server's interpreter."""

from __future__ import annotations

import dataclasses

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
RANKS = {"logprobs": 1, "old_logprobs": 1, "advantages": 1}


def clipped_pg(logprobs, old_logprobs, advantages):
    """A per-datum PPO-style clipped objective, with two metrics."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    objective = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -objective.sum()
    clip_frac = (ratio != clipped).float().mean()
    return loss, {"custom/clip_frac:mean": clip_frac, "custom/objective:sum": objective.sum()}


def client_side(fn):
    """The per-datum loss as a plain forward_backward_custom callable, reduced like the SDK's
    run_loss_handle (losses and :sum metrics summed, :mean metrics averaged over datums)."""
    calls: list[tuple[float, dict[str, float]]] = []

    def loss_fn(data: list[types.Datum], logprobs: list[torch.Tensor]):
        total, sums = None, {}
        for datum, lp in zip(data, logprobs):
            x = datum.loss_fn_inputs
            loss, metrics = fn(lp, x["old_logprobs"].to_torch(), x["advantages"].to_torch())
            total = loss if total is None else total + loss
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        metrics = {k: v / len(data) if k.endswith(":mean") else v for k, v in sums.items()}
        calls.append((float(total.detach()), metrics))
        return total, metrics

    loss_fn.calls = calls  # type: ignore[attr-defined]
    return loss_fn


def rl_data(rows: list[list[int]], current: list[np.ndarray], seed: int = 0) -> list[types.Datum]:
    """Old logprobs around the current ones (so some ratios are clipped), advantages of both signs."""
    rng = np.random.default_rng(seed)
    data = []
    for i, (row, lp) in enumerate(zip(rows, current)):
        n = len(row) - 1
        old = (lp + (-0.25, 0.1, 0.3, -0.05)[i % 4] + rng.normal(0, 0.2, n)).astype(np.float32)
        adv = rng.uniform(-0.4, 0.4, n).astype(np.float32)
        data.append(types.Datum(model_input=types.ModelInput.from_ints(row[:-1]),
                                loss_fn_inputs={"target_tokens": row[1:], "old_logprobs": old, "advantages": adv}))
    return data


def logprobs_of(output: types.ForwardBackwardOutput) -> list[np.ndarray]:
    return [out["logprobs"].to_numpy() for out in output.loss_fn_outputs]


def numpy_reference(current: list[np.ndarray], data: list[types.Datum]) -> tuple[float, float, float]:
    """clipped_pg in numpy: (loss, clip_frac averaged over datums, objective summed)."""
    loss = objective_sum = clip_frac = 0.0
    for lp, d in zip(current, data):
        old, adv = d.loss_fn_inputs["old_logprobs"].to_numpy(), d.loss_fn_inputs["advantages"].to_numpy()
        ratio = np.exp(lp.astype(np.float64) - old)
        clipped = np.clip(ratio, 0.8, 1.2)
        objective = np.minimum(ratio * adv, clipped * adv)
        loss -= objective.sum()
        objective_sum += objective.sum()
        clip_frac += (ratio != clipped).mean() / len(data)
    return loss, clip_frac, objective_sum


@pytest.fixture(scope="module")
def service(server):
    sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-custom-loss")
    yield sc
    sc.close("success").result()


def test_client_side_custom_loss_reports_its_value_and_metrics(service, token_rows) -> None:
    tc = service.create_lora_training_client(BASE, rank=8, seed=4).result()
    current = logprobs_of(tc.forward(make_data(token_rows), "cross_entropy").result())
    data = rl_data(token_rows, current)
    loss_fn = client_side(clipped_pg)
    result = tc.forward_backward_custom(data, loss_fn).result()
    tc.optim_step(types.AdamParams(learning_rate=LR)).result()

    (value, metrics), = loss_fn.calls
    assert result.metrics["loss:sum"] == pytest.approx(value, rel=1e-6)
    assert result.metrics["custom/clip_frac:mean"] == pytest.approx(metrics["custom/clip_frac:mean"])
    assert result.metrics["custom/objective:sum"] == pytest.approx(metrics["custom/objective:sum"])
    ref_loss, ref_clip, ref_obj = numpy_reference(current, data)
    assert value == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert metrics["custom/objective:sum"] == pytest.approx(ref_obj, rel=1e-5, abs=1e-5)
    assert 0.05 < ref_clip < 0.95 and metrics["custom/clip_frac:mean"] == pytest.approx(ref_clip, abs=1e-6)

    # The backward pass was a cross_entropy with weights = -dL/dlogprobs (of both signs here):
    # its loss, reported as surrogate_loss:sum, is sum(logprobs * dL/dlogprobs).
    grads = []
    for lp, d in zip(current, data):
        t = torch.tensor(lp, requires_grad=True)
        x = d.loss_fn_inputs
        clipped_pg(t, x["old_logprobs"].to_torch(), x["advantages"].to_torch())[0].backward()
        grads.append(t.grad.numpy())
    assert min(g.min() for g in grads) < 0 < max(g.max() for g in grads)
    surrogate = sum(float((lp.astype(np.float64) * g).sum()) for lp, g in zip(current, grads))
    assert result.metrics["surrogate_loss:sum"] == pytest.approx(surrogate, rel=1e-4, abs=1e-5)
    assert [o["logprobs"].to_numpy().shape for o in result.loss_fn_outputs] == [(len(r) - 1,) for r in token_rows]


def test_server_side_loss_equals_the_client_side_run(service, token_rows) -> None:
    assert service.holder.get_client_config().custom_loss_server_side is True
    handle = service.create_custom_loss(clipped_pg, RANKS).result()
    assert handle.loss_id is not None  # uploaded: the server runs it
    assert handle.input_names == ("old_logprobs", "advantages")

    on_client = service.create_lora_training_client(BASE, rank=8, seed=9).result()
    on_server = service.create_lora_training_client(BASE, rank=8, seed=9).result()
    current = logprobs_of(on_client.forward(make_data(token_rows), "cross_entropy").result())
    data = rl_data(token_rows, current, seed=1)

    loss_fn = client_side(clipped_pg)
    fb_client = on_client.forward_backward_custom(data, loss_fn)
    fb_server = on_server.forward_backward_custom(data, handle)
    opt_client = on_client.optim_step(GRAD_STEP)
    opt_server = on_server.optim_step(GRAD_STEP)
    client_out, server_out = fb_client.result(), fb_server.result()
    opt_client.result(), opt_server.result()

    assert server_out.metrics["loss:sum"] == pytest.approx(client_out.metrics["loss:sum"], rel=1e-5, abs=1e-5)
    for key in ("custom/clip_frac:mean", "custom/objective:sum"):
        assert server_out.metrics[key] == pytest.approx(client_out.metrics[key], rel=1e-5, abs=1e-5), key
    ref_loss, ref_clip, _ = numpy_reference(current, data)
    assert server_out.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert 0.05 < ref_clip < 0.95
    for lp_server, lp_now in zip(logprobs_of(server_out), current):
        np.testing.assert_allclose(lp_server, lp_now, atol=1e-5, rtol=0)

    plain = make_data(token_rows)
    after_client = logprobs_of(on_client.forward(plain, "cross_entropy").result())
    after_server = logprobs_of(on_server.forward(plain, "cross_entropy").result())
    assert max(float(np.abs(a - b).max()) for a, b in zip(after_client, current)) > 1e-3  # it did train
    for a, b in zip(after_client, after_server):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_an_op_outside_the_allow_list_is_refused_naming_it(service) -> None:
    def uses_matmul(logprobs, advantages):
        loss = -torch.matmul(logprobs, advantages)  # the SDK's own checks accept any torch function
        return loss, {"custom/dot:sum": loss}

    with pytest.raises(tinker.BadRequestError) as err:
        service.create_custom_loss(uses_matmul, {"logprobs": 1, "advantages": 1}).result()
    body = err.value.body
    assert isinstance(body, dict) and body.get("category") == "user", body
    assert "torch.matmul" in body["error"] and "not allowed" in body["error"], body
    assert body.get("field") == "graph"


def test_a_handle_from_another_session_is_refused(server, service, token_rows) -> None:
    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    handle = service.create_custom_loss(neg_ll, {"logprobs": 1, "weights": 1}).result()
    assert handle.loss_id is not None
    data = make_data(token_rows)
    with tinker.ServiceClient(base_url=server.base_url, api_key="tml-custom-loss") as other:  # same tenant
        tc = other.create_lora_training_client(BASE, rank=4, seed=0).result()
        # The SDK refuses first: a handle records its session.
        with pytest.raises(ValueError, match="only be used by clients of that session"):
            tc.forward_backward_custom(data, handle)
        # With that check bypassed, the server refuses the loss_id: it belongs to another session.
        forged = dataclasses.replace(handle, session_id=other.holder.get_session_id())
        with pytest.raises(tinker.NotFoundError) as err:
            tc.forward_backward_custom(data, forged).result()
        assert handle.loss_id in str(err.value) and "session" in str(err.value)
        # The session's own clients still use it.
        mine = service.create_lora_training_client(BASE, rank=4, seed=0).result()
        out = mine.forward_backward_custom(data, handle).result()
        expected = -sum(float(o["logprobs"].to_numpy().astype(np.float64).sum()) for o in out.loss_fn_outputs)
        assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        assert out.metrics["custom/neg_ll:sum"] == pytest.approx(expected, rel=1e-5)
