"""LoRA adapters in the trainer, as the unit tests set them up."""

from __future__ import annotations

import torch

from workers.trainer import LoraTrainer


def perturb_b(trainer: LoraTrainer, name: str, seed: int) -> None:
    """Randomise an adapter's LoRA B matrices (seeded). A fresh B is 0, so A would get no gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in trainer._adapter(name).params.items():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
