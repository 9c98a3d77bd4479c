"""The native Twinkle API's training operations on the trainer (workers/native_training.py):
the minimal flow's loss falls, accumulation and clipping follow Twinkle, paging keeps the
optimizer's state, bad input names its field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.lora import perturb_b
from workers.native_args import NativeArgError
from workers.native_training import NativeTraining
from workers.trainer import LoraTrainer, load_base_model
from workers.types import BaseModelInfo, LoraSpec

INFO = BaseModelInfo(name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=4096, max_context_length=4096,
                     eos_token_ids=(2,))
ROWS = [[5, 9, 33, 71, 12, 8, 40], [7, 3, 99, 14, 5]]
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")


def features(rows: list[list[int]] = ROWS) -> list[dict]:
    """Next-token aligned: labels[t] = input_ids[t + 1], the last one -100."""
    return [{"input_ids": r, "labels": r[1:] + [-100]} for r in rows]


@pytest.fixture(scope="module")
def trainer(tiny_model_dir: Path) -> LoraTrainer:
    return LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0, max_resident=1)


@pytest.fixture()
def native(trainer: LoraTrainer):
    trainer.create_adapter("natA", LoraSpec(rank=4, seed=0))
    perturb_b(trainer, "natA", seed=1)
    yield NativeTraining(trainer)
    trainer.remove_adapter("natA")


def test_the_minimal_flow_lowers_the_loss(native: NativeTraining) -> None:
    native.call("natA", "set_loss", {"loss_cls": "CrossEntropyLoss"})
    native.call("natA", "set_optimizer", {"optimizer_cls": "AdamW", "lr": 1e-2})
    losses = []
    for _ in range(5):
        result = native.call("natA", "forward_backward", {"inputs": features()})
        native.call("natA", "clip_grad_and_step", {"max_grad_norm": 1.0})
        losses.append(result["loss"])
    assert losses[-1] < losses[0], losses
    assert len(result["logps"]) == 2 and len(result["logps"][0]) == 7 and result["num_tokens"] == 0
    metric = native.call("natA", "calculate_metric", {"is_training": True})
    # Twinkle counts iters as (backwards - 1) // accumulation steps: 4 after 5 steps.
    assert float(metric["loss"]) > 0 and "grad_norm" in metric and metric["iters"] == 4


def test_paging_out_and_in_keeps_the_optimizer_state(trainer: LoraTrainer, native: NativeTraining) -> None:
    native.call("natA", "set_optimizer", {"optimizer_cls": "Adam", "lr": 1e-2})
    native.call("natA", "set_lr_scheduler", {"scheduler_cls": "StepLR", "step_size": 1, "gamma": 0.5})
    for _ in range(2):
        native.call("natA", "forward_backward", {"inputs": features()})
        native.call("natA", "clip_grad_and_step", {})
    trainer.create_adapter("natB", LoraSpec(rank=4, seed=1))  # max_resident=1: natA is paged out
    try:
        trainer.pool.get("natB")
        native.call("natA", "forward_backward", {"inputs": features()})
        native.call("natA", "clip_grad_and_step", {})
        state = native._states["natA"]
        assert state.optimizer.state_dict()["state"][0]["step"] == 3
        assert state.scheduler.get_last_lr()[0] == pytest.approx(1e-2 * 0.5**3)
        params = {id(p) for p in trainer.pool.get("natA").params.values()}
        assert {id(p) for g in state.optimizer.param_groups for p in g["params"]} == params
    finally:
        trainer.remove_adapter("natB")


def test_sum_reduction_is_divided_by_the_accumulated_tokens_at_the_clip(native: NativeTraining) -> None:
    native.call("natA", "set_optimizer", {"optimizer_cls": "SGD", "lr": 0.0})
    out = native.call("natA", "forward_backward", {"inputs": features()})  # default: CrossEntropy(sum)
    assert out["num_tokens"] == sum(len(r) - 1 for r in ROWS)
    norm = float(native.call("natA", "clip_grad_norm", {"max_grad_norm": 1e9}))
    assert norm > 0


@pytest.mark.parametrize("op,kwargs,field", [
    ("set_loss", {"loss_cls": "NoSuchLoss"}, "loss_cls"),
    ("set_optimizer", {"optimizer_cls": "os.system"}, "optimizer_cls"),
    ("set_lr_scheduler", {"scheduler_cls": "StepLR", "step_size": 1}, "scheduler_cls"),
    ("forward_backward", {"inputs": [{"input_ids": [1, 2], "labels": [2]}]}, "inputs"),
    ("forward_backward", {"inputs": [{"input_ids": [1, 2.5], "labels": [2, -100]}]}, "inputs"),
    ("forward_backward", {"inputs": [{"input_ids": [1, 99999], "labels": [2, -100]}]}, "inputs"),
    ("forward_backward", {"inputs": features(), "temperature": 0}, "temperature"),
    ("clip_grad_and_step", {"max_grad_norm": 1.0, "bogus": 1}, "bogus"),
    ("no_such_op", {}, "op"),
])
def test_bad_input_names_its_field(native: NativeTraining, op: str, kwargs: dict, field: str) -> None:
    with pytest.raises(NativeArgError) as err:
        native.call("natA", op, kwargs)
    assert err.value.field == field, str(err.value)


def test_the_split_step_equals_forward_backward(trainer: LoraTrainer, native: NativeTraining) -> None:
    """forward + calculate_loss + backward (Twinkle's split step) == forward_backward."""
    trainer.create_adapter("natS", LoraSpec(rank=4, seed=0))
    perturb_b(trainer, "natS", seed=1)  # natA's twin
    try:
        for name in ("natA", "natS"):
            native.call(name, "set_loss", {"loss_cls": "CrossEntropyLoss"})
            native.call(name, "set_optimizer", {"optimizer_cls": "SGD", "lr": 0.5})
        whole = native.call("natA", "forward_backward", {"inputs": features()})
        native.call("natA", "clip_grad_and_step", {})
        forward = native.call("natS", "forward", {"inputs": features()})
        loss = native.call("natS", "calculate_loss", {})
        native.call("natS", "backward", {})
        native.call("natS", "clip_grad_and_step", {})
        assert loss == pytest.approx(whole["loss"], abs=1e-6)
        np.testing.assert_allclose(forward["logps"], whole["logps"], atol=1e-6)
        # One resident adapter at a time here (max_resident=1): copy each while it is in.
        a = {k: p.detach().clone() for k, p in trainer.pool.get("natA").params.items()}
        s = {k: p.detach().clone() for k, p in trainer.pool.get("natS").params.items()}
        assert max(float((a[k] - s[k]).abs().max()) for k in a) < 1e-6
        with pytest.raises(NativeArgError, match="forward first"):
            native.call("natS", "calculate_loss", {})
    finally:
        trainer.remove_adapter("natS")


def test_state_dict_processor_and_metric_choices(native: NativeTraining) -> None:
    weights = native.call("natA", "get_state_dict", {})
    assert weights and all(isinstance(v, list) for v in weights.values())
    native.call("natA", "set_processor", {"processor_cls": "InputProcessor", "padding_side": "right"})
    native.call("natA", "add_metric", {"metric_cls": "LossMetric", "is_training": True})
    with pytest.raises(NativeArgError) as err:
        native.call("natA", "add_metric", {"metric_cls": "Accuracy"})
    assert err.value.field == "metric_cls"
