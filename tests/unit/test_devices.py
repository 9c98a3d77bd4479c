"""Devices and dtypes: the trainer runs a bfloat16 base model (here on the CPU), keeping LoRA
weights, logprobs and losses in float32, and it trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.wire import DatumIn
from tests.support.lora import perturb_b
from workers.losses import get_loss
from workers.trainer import LoraTrainer, load_base_model, resolve_device
from workers.types import AdamConfig, BaseModelInfo, LoraSpec

INFO = BaseModelInfo(name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=4096, max_context_length=4096)


def test_device_defaults_follow_the_machine() -> None:
    device, dtype = resolve_device(None, None)
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (device.type, dtype) == ("cpu", torch.float32)
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0", None)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_a_bfloat16_model_trains_with_float32_lora_and_logprobs(tiny_model_dir: Path) -> None:
    base = load_base_model(tiny_model_dir, device="cpu", dtype=torch.bfloat16)
    assert next(base.parameters()).dtype == torch.bfloat16
    trainer = LoraTrainer(base, INFO, pad_token_id=0)
    assert trainer._split_head  # logprobs come from the decoder and the head in chunks
    trainer.create_adapter("bf16", LoraSpec(rank=8, seed=0))
    perturb_b(trainer, "bf16", 0)
    assert {p.dtype for p in trainer._adapter("bf16").params.values()} == {torch.float32}
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 4096, size=(2, 17))
    data = [DatumIn(tokens=row[:-1], loss_fn_inputs={"target_tokens": row[1:]}) for row in tokens]
    losses = []
    for _ in range(10):
        result = trainer.forward_backward("bf16", data, get_loss("cross_entropy"), {})
        assert result.outputs[0]["logprobs"].dtype == np.float32
        losses.append(result.metrics["loss:sum"])
        trainer.optim_step("bf16", AdamConfig(learning_rate=1e-2))
    # It memorises the two sequences as float32 does (267 -> ~100 in 10 steps).
    assert np.isfinite(losses).all() and max(losses[-3:]) < 0.6 * losses[0]
