"""LoRA adapters in the trainer, as the unit tests set them up."""

from __future__ import annotations

import numpy as np
import torch

from schemas.wire import DatumIn
from workers.custom_loss import CustomLoss, compile_graph
from workers.trainer import LoraTrainer

VOCAB = 4096  # tiny-qwen3's


def perturb_b(trainer: LoraTrainer, name: str, seed: int) -> None:
    """Randomise an adapter's LoRA B matrices (seeded). A fresh B is 0, so A would get no gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in trainer._adapter(name).params.items():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def custom_loss() -> CustomLoss:
    """sum(-logprobs * weights), with a :sum and a :mean metric, as the SDK would trace it."""
    def node(name, target, *args, op="call_function"):
        return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": {}}

    nodes = [
        node("logprobs", "logprobs", op="placeholder"),
        node("weights", "weights", op="placeholder"),
        node("mul", "operator.mul", {"ref": "logprobs"}, {"ref": "weights"}),
        node("total", "sum", {"ref": "mul"}, op="call_method"),
        node("loss", "operator.neg", {"ref": "total"}),
        node("avg", "mean", {"ref": "logprobs"}, op="call_method"),
    ]
    metrics = {"dict": {"custom/nll:sum": {"ref": "loss"}, "custom/lp:mean": {"ref": "avg"}}}
    nodes.append({"op": "output", "name": "output", "target": "output",
                  "args": [{"tuple": [{"ref": "loss"}, metrics]}], "kwargs": {}})
    inputs = [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 1}]
    return compile_graph({"format": 1, "nodes": nodes}, inputs, name="nll")


def datum(rng: np.random.Generator, n: int, loss: str) -> DatumIn:
    """A datum of `n` tokens with the inputs loss `loss` takes (random, seeded by `rng`)."""
    tokens = rng.integers(3, VOCAB, size=n + 1)
    inputs: dict[str, np.ndarray] = {"target_tokens": tokens[1:]}
    if loss in ("cross_entropy", "custom"):
        inputs["weights"] = rng.uniform(0, 1, n).astype(np.float32)
    else:
        inputs["logprobs"] = rng.uniform(-9, -7, n).astype(np.float32)
        inputs["advantages"] = rng.normal(size=n).astype(np.float32)
        if loss == "gspo":
            inputs["sequence_ratio_mask"] = (rng.uniform(size=n) < 0.7).astype(np.float32)
    return DatumIn(tokens=tokens[:-1], loss_fn_inputs=inputs)


def magnitude(group: list[DatumIn], outputs: list[dict[str, np.ndarray]]) -> float:
    """A bound on the summed size of a loss's terms before they cancel (RL losses add terms of
    both signs): a float32 sum is exact only to a small multiple of eps times that, whatever
    the order of its additions."""
    total = 0.0
    for d, out in zip(group, outputs):
        inputs = sum(np.abs(v) for k, v in d.loss_fn_inputs.items() if k != "target_tokens")
        total += float(np.sum(np.abs(out["logprobs"]) * (1 + inputs)))
    return total
