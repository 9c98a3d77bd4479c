"""A LoRA run through the server equals the same run done in-process with plain peft + torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from peft import LoraConfig, get_peft_model
from tinker import types
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow
SEED, RANK, STEPS, LR, ALPHA = 1234, 8, 5, 3e-3, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def fixed_batch() -> tuple[np.ndarray, np.ndarray]:
    tokens = np.random.default_rng(42).integers(3, 4096, size=(8, 33))
    # Mean-normalised weights keep the summed loss near the per-token CE (~8), so an absolute
    # 1e-5 tolerance is a tight one.
    weights = np.full((8, 32), 1.0 / (8 * 32), dtype=np.float32)
    return tokens, weights


def server_losses(base_url: str) -> list[float]:
    tokens, weights = fixed_batch()
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                    loss_fn_inputs={"target_tokens": row[1:].tolist(), "weights": w})
        for row, w in zip(tokens, weights)
    ]
    with tinker.ServiceClient(base_url=base_url, api_key="tml-numerics") as sc:
        tc = sc.create_lora_training_client("tiny-qwen3", rank=RANK, seed=SEED).result()
        losses = []
        for _ in range(STEPS):
            fb = tc.forward_backward(data, "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=LR, weight_decay=0.01, grad_clip_norm=1.0)).result()
            losses.append(fb.result().metrics["loss:sum"])
    return losses


def reference_losses(model_dir: Path) -> list[float]:
    """Plain peft + torch, written independently of workers/trainer.py."""
    tokens, weights = fixed_batch()
    inputs, targets = torch.tensor(tokens[:, :-1]), torch.tensor(tokens[:, 1:])
    w = torch.tensor(weights)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    base.requires_grad_(False)
    torch.manual_seed(SEED)
    model = get_peft_model(base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.01)
    losses = []
    for _ in range(STEPS):
        logprobs = torch.log_softmax(model(input_ids=inputs).logits.float(), dim=-1)
        loss = -(logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * w).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_server_run_matches_in_process_peft(server, tiny_model_dir) -> None:
    through_server = server_losses(server.base_url)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the server's compute thread count; the server is idle meanwhile
    try:
        in_process = reference_losses(tiny_model_dir)
    finally:
        torch.set_num_threads(threads)
    assert through_server[-1] < through_server[0]
    print("max |server - in-process| loss difference:", max(abs(a - b) for a, b in zip(through_server, in_process)))
    np.testing.assert_allclose(through_server, in_process, atol=1e-5, rtol=0)
