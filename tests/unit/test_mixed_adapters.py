"""The ground packed execution (issue 13) will stand on: with the model in eval mode, as PeftHost
keeps it, peft's per-row adapter routing (`adapter_names`) carries rows of several adapters of
different ranks and targets through one base pass with exactly the losses and gradients of running
each adapter alone. Pinned here, so that a peft upgrade that breaks it is seen at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.peft_host import PeftHost
from workers.trainer import load_base_model
from workers.types import LoraSpec

SPECS = {"a": LoraSpec(rank=4, seed=1), "b": LoraSpec(rank=8, seed=2, train_mlp=False),
         "c": LoraSpec(rank=2, seed=3, train_unembed=True)}


def token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


@pytest.fixture(scope="module")
def host(tiny_model_dir: Path) -> tuple[PeftHost, dict]:
    host = PeftHost(load_base_model(tiny_model_dir))
    params = {name: host.add(name, spec) for name, spec in SPECS.items()}
    generator = torch.Generator().manual_seed(0)
    for adapter in params.values():  # LoRA B starts at zero: give every factor a say
        for p in adapter.values():
            p.requires_grad_(True)
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return host, params


def test_rows_routed_to_their_adapters_in_one_pass_match_each_adapter_alone(host) -> None:
    host, params = host
    rows = ["a", "b", "c", "a", "b"]
    ids = torch.randint(3, 4000, (len(rows), 9), generator=torch.Generator().manual_seed(1))
    alone, alone_grads = torch.zeros(len(rows)), {}
    for name, adapter in params.items():
        host.activate(name, adapter)
        index = [i for i, r in enumerate(rows) if r == name]
        losses = token_losses(host.model(input_ids=ids[index]).logits, ids[index])
        losses.sum().backward()
        alone[index] = losses.detach()
        for key, p in adapter.items():
            alone_grads[name, key], p.grad = p.grad, None
    packed = token_losses(host.model(input_ids=ids, adapter_names=rows).logits, ids)
    packed.sum().backward()
    torch.testing.assert_close(packed.detach(), alone, rtol=0, atol=1e-5)
    for (name, key), grad in alone_grads.items():
        torch.testing.assert_close(params[name][key].grad, grad, rtol=0, atol=1e-5)
        params[name][key].grad = None
