"""A checkpoint's LoRA merged into a full copy of its base model (an export: server/ops/export.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel

from workers.peft_host import quiet_peft
from workers.trainer import load_base_model


def merge_adapter(model_dir: Path, adapter_dir: Path) -> PreTrainedModel:
    """A fresh float32 copy of the base model with the adapter merged into its weights.

    The tiny models (and many small ones) tie the output embedding to the input embedding. A LoRA
    on lm_head changes only the output side, so merging it into a tied weight would change the
    input embedding too: the output embedding gets a weight of its own first, and the saved
    config says the two are no longer tied."""
    base = load_base_model(model_dir, dtype=torch.float32)
    with quiet_peft():  # the warning that lm_head is tied: handled below
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    out, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if isinstance(out, BaseTunerLayer) and out.get_base_layer().weight is embed.weight:
        layer = out.get_base_layer()
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        _untie(base.config)
    return model.merge_and_unload()


def _untie(config: object) -> None:
    config.tie_word_embeddings = False
    text_config = getattr(config, "get_text_config", lambda: config)()
    if text_config is not config:
        text_config.tie_word_embeddings = False

