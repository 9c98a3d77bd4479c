"""Native Twinkle optimizers, LR schedulers, accumulation and metrics (workers/native_optim.py)
against twinkle-kit 0.5.1.

The reference (one subprocess of the twinkle-kit venv, tests/support/twinkle_ref.py) runs:
  * every allowed scheduler for 50 steps through twinkle's set_lr_scheduler lookup;
  * twinkle's parameter-group split and set_optimizer construction, then a few steps;
  * its gradient-accumulation rule (BaseOptimizerGroup.do_grad_sync);
  * whole training loops of twinkle's TransformersModel on a tiny random Qwen3 with a LoRA
    adapter: forward_backward, clip_grad_and_step, calculate_metric. We replay each loop with
    the reference's logps and raw gradients through our loss, accumulator, optimizer, scheduler
    and metrics, and compare losses, grad norms, parameters, learning rates and metrics.
The error tests at the end need no reference.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.twinkle_ref import Reference, run_reference
from tests.support.twinkle_ref_worker import module_tree
from workers.native_args import NativeArgError, UnknownNativeName
from workers.native_losses import build_loss, default_loss
from workers.native_optim import (
    OPTIMIZERS,
    SCHEDULERS,
    ForwardRecord,
    GradientAccumulator,
    MetricAccumulator,
    MetricContext,
    accuracy_counts,
    apply_optim_params,
    build_optimizer,
    build_scheduler,
    current_lrs,
    is_no_decay,
    layer_norm_param_names,
)

ROOT = Path(__file__).resolve().parents[2]
STEPS = 50


def _gen(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


# ---------------------------------------------------------------------------------------------
# The cases.

SCHEDULER_CASES: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    (
        "cosine_warmup",
        "CosineWarmupScheduler",
        {"num_warmup_steps": 5, "num_training_steps": 30},
        "AdamW",
        {"lr": 1e-3},
    ),
    (
        "cosine_warmup_cycles",
        "CosineWarmupScheduler",
        {"num_warmup_steps": 0, "num_training_steps": 40, "num_cycles": 1.5},
        "AdamW",
        {"lr": 1e-3},
    ),
    (
        "linear_warmup",
        "LinearWarmupScheduler",
        {"num_warmup_steps": 5, "num_training_steps": 30},
        "AdamW",
        {"lr": 2e-3},
    ),
    ("linear_nowarmup", "LinearWarmupScheduler", {"num_warmup_steps": 0, "num_training_steps": 20}, "SGD", {"lr": 0.1}),
    ("step", "StepLR", {"step_size": 7, "gamma": 0.5}, "AdamW", {}),
    ("multistep", "MultiStepLR", {"milestones": [5, 12, 30], "gamma": 0.3}, "Adam", {"lr": 1e-2}),
    ("constant", "ConstantLR", {"factor": 0.5, "total_iters": 10}, "AdamW", {"lr": 1e-3}),
    ("linear", "LinearLR", {"start_factor": 0.1, "total_iters": 20}, "AdamW", {"lr": 1e-3}),
    ("exponential", "ExponentialLR", {"gamma": 0.95}, "SGD", {"lr": 0.1}),
    ("polynomial", "PolynomialLR", {"total_iters": 40, "power": 2.0}, "AdamW", {"lr": 1e-3}),
    ("cosine", "CosineAnnealingLR", {"T_max": 20, "eta_min": 1e-5}, "AdamW", {"lr": 1e-3}),
    ("restarts", "CosineAnnealingWarmRestarts", {"T_0": 10, "T_mult": 2, "eta_min": 1e-6}, "AdamW", {"lr": 1e-3}),
    (
        "cyclic_adamw",
        "CyclicLR",
        {"base_lr": 1e-4, "max_lr": 1e-3, "step_size_up": 5, "mode": "triangular2"},
        "AdamW",
        {"lr": 1e-3},
    ),
    (
        "cyclic_sgd",
        "CyclicLR",
        {"base_lr": 1e-3, "max_lr": 1e-2, "step_size_up": 4, "step_size_down": 6, "mode": "exp_range", "gamma": 0.97},
        "SGD",
        {"lr": 0.1, "momentum": 0.9},
    ),
    ("onecycle", "OneCycleLR", {"max_lr": 1e-2, "total_steps": 60}, "AdamW", {"lr": 1e-3}),
    (
        "onecycle_epochs",
        "OneCycleLR",
        {"max_lr": 1e-2, "epochs": 5, "steps_per_epoch": 12, "anneal_strategy": "linear", "three_phase": True},
        "SGD",
        {"lr": 0.1, "momentum": 0.9},
    ),
]

# Names as peft and Twinkle's multi-LoRA give them, plus every way a name can be exempt.
PARAMS = [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.A.weight", [4, 8]),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.A.weight", [8, 4]),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.A.bias", [8]),  # lora_bias=True
    ("base_model.model.model.layers.0.input_layernorm.weight", [8]),
    ("base_model.model.model.layers.0.self_attn.q_norm.weight", [8]),
    ("base_model.model.model.norm.weight", [8]),
    ("base_model.model.model.final_RMSNorm.weight", [8]),
    ("base_model.model.model.enorm.weight", [8]),  # no boundary before "norm": decayed
    ("base_model.model.model.norm_out.weight", [8]),  # decayed as well
    ("base_model.model.model.unbiased.lora_A.A.weight", [4, 8]),  # "bias" inside a name: exempt
    ("base_model.model.lm_head.weight", [8, 8]),
    ("base_model.model.frozen.weight", [8]),
    ("top", [3]),
]
LAYER_NORMS = ["base_model.model.model.ln_f"]  # a LayerNorm by type, not by name
FROZEN = ["base_model.model.frozen.weight"]
OPTIMIZER_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("adamw_defaults", "AdamW", {}),
    ("adamw", "AdamW", {"lr": 1e-2, "weight_decay": 0.1, "betas": [0.8, 0.99], "eps": 1e-6, "amsgrad": True}),
    ("adam_l2", "Adam", {"lr": 1e-2}),  # Twinkle's default decay 0.01 becomes Adam's L2 term
    ("adam_decoupled", "Adam", {"lr": 1e-2, "weight_decay": 0.2, "decoupled_weight_decay": True, "maximize": True}),
    ("sgd_nesterov", "SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("sgd", "SGD", {"lr": 0.1, "momentum": 0.5, "dampening": 0.1, "weight_decay": 0.05, "maximize": True}),
]
OPT_STEPS = 3

ACCUMULATION_CASES: list[tuple[str, int, list[int | None]]] = [
    ("gas1", 1, [None] * 6),
    ("gas2", 2, [None] * 10),
    ("gas3", 3, [None] * 12),
    ("gas4_given", 1, [4] * 12),
    ("sticky_change", 2, [None, None, None, 3, None, None, None, None, 1, None, 2, None, None]),
]


def _tree(cid: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The case's module tree with its random initial values (the same on both sides)."""
    tree = module_tree(PARAMS, LAYER_NORMS, FROZEN)
    g, init = _gen(cid), {}
    with torch.no_grad():
        for n, p in tree.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            init[n] = p.detach().clone()
    return tree, init


def _grads(cid: str, tree: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    g = _gen(cid + "/grads")
    return [
        {n: torch.randn(p.shape, generator=g) for n, p in tree.named_parameters() if p.requires_grad}
        for _ in range(OPT_STEPS)
    ]


# ---------------------------------------------------------------------------------------------
# The training loops (e2e): twinkle's TransformersModel on a tiny Qwen3, LoRA adapter "A".

MODEL_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "tie_word_embeddings": False,
}
MODEL_KWARGS = ("return_logits", "temperature", "gradient_accumulation_steps")  # not the loss's


def _batch(key: str, lengths: list[int]) -> list[dict[str, list[int]]]:
    """Next-token aligned sequences: labels[i] = input_ids[i + 1], the prompt and the last -100."""
    g, out = _gen(key), []
    for n in lengths:
        ids = torch.randint(0, MODEL_CONFIG["vocab_size"], (n,), generator=g).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=g))
        labels = [-100] * (prompt - 1) + ids[prompt:] + [-100]
        out.append({"input_ids": ids, "labels": labels})
    return out


def _grpo_kwargs(key: str, inputs: list[dict[str, list[int]]]) -> dict[str, Any]:
    g = _gen(key)
    trained = [sum(1 for t in x["labels"] if t != -100) for x in inputs]
    width = max(len(x["labels"]) for x in inputs)
    return {
        "advantages": torch.randn(len(inputs), generator=g).tolist(),
        "old_logps": [(-6.2 + 0.3 * torch.randn(n, generator=g)).tolist() for n in trained],
        "ref_logps": [(-6.2 + 0.3 * torch.randn(width, generator=g)).tolist() for _ in inputs],
    }


def _fb(key: str, lengths: list[int], **kwargs: Any) -> dict[str, Any]:
    return {"op": "fb", "inputs": _batch(key, lengths), "kwargs": kwargs}


def _grpo_fb(key: str, lengths: list[int]) -> dict[str, Any]:
    op = _fb(key, lengths)
    op["kwargs"] = _grpo_kwargs(key + "/rl", op["inputs"])
    return op


STEP, METRIC = {"op": "step", "kwargs": {"max_grad_norm": 1.0}}, {"op": "metric", "is_training": True}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
SCENARIOS: list[dict[str, Any]] = [
    {
        # Twinkle's default loss (a summed cross-entropy), gradient accumulation over 2 set at
        # add_adapter_to_model (the first step after 3 micro-batches), clipping that bites.
        "id": "sum_ce_adamw_gas2",
        "seed": 1,
        "adapter_kwargs": {"gradient_accumulation_steps": 2},
        "lora": {**LORA, "lora_bias": True},
        "ops": [
            {"op": "set_optimizer", "name": "AdamW", "kwargs": {"lr": 1e-2}},
            {
                "op": "set_lr_scheduler",
                "name": "CosineWarmupScheduler",
                "kwargs": {"num_warmup_steps": 1, "num_training_steps": 4},
            },
            _fb("a0", [9, 6]),
            {"op": "step", "kwargs": {"max_grad_norm": 0.05}},
            _fb("a1", [7, 7, 5], return_logits=True),
            {"op": "step", "kwargs": {"max_grad_norm": 0.05}},
            _fb("a2", [8]),
            {"op": "step", "kwargs": {"max_grad_norm": 0.05}},
            METRIC,
            _fb("a3", [6, 9]),
            {"op": "step", "kwargs": {"max_grad_norm": 0.05}},
            _fb("a4", [5, 8], return_logits=True),
            {"op": "step", "kwargs": {"max_grad_norm": 0.05}},
            METRIC,
            METRIC,
        ],
    },
    {
        # A mean cross-entropy, Adam with L2 decay, StepLR; the accumulation changes to 2 midway.
        "id": "mean_ce_adam",
        "seed": 2,
        "adapter_kwargs": {},
        "lora": {**LORA, "init_lora_weights": False},
        "ops": [
            {"op": "set_loss", "name": "CrossEntropyLoss", "kwargs": {}},
            {"op": "set_optimizer", "name": "Adam", "kwargs": {"lr": 5e-3, "weight_decay": 0.1, "betas": [0.8, 0.95]}},
            {"op": "set_lr_scheduler", "name": "StepLR", "kwargs": {"step_size": 2, "gamma": 0.5}},
            _fb("b0", [8, 5]),
            STEP,
            _fb("b1", [6, 6]),
            STEP,
            _fb("b2", [9, 4], gradient_accumulation_steps=2),
            STEP,
            _fb("b3", [7]),
            STEP,
            _fb("b4", [5, 7]),
            STEP,
            METRIC,
        ],
    },
    {
        # GRPO with wire-form advantages / old_logps / ref_logps, SGD with momentum, L1 clipping.
        "id": "grpo_sgd",
        "seed": 3,
        "adapter_kwargs": {},
        "lora": {**LORA, "init_lora_weights": False},
        "ops": [
            {"op": "set_loss", "name": "GRPOLoss", "kwargs": {"beta": 0.05, "epsilon": 0.1}},
            {"op": "set_optimizer", "name": "SGD", "kwargs": {"lr": 0.5, "momentum": 0.9}},
            {
                "op": "set_lr_scheduler",
                "name": "LinearWarmupScheduler",
                "kwargs": {"num_warmup_steps": 0, "num_training_steps": 5},
            },
            _grpo_fb("c0", [8, 6, 7]),
            {"op": "step", "kwargs": {"max_grad_norm": 1.0, "norm_type": 1}},
            _grpo_fb("c1", [5, 9]),
            {"op": "step", "kwargs": {"max_grad_norm": 1.0, "norm_type": 1}},
            METRIC,
        ],
    },
]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    tensors: dict[str, torch.Tensor] = {}
    opt_cases = []
    for cid, name, kwargs in OPTIMIZER_CASES:
        tree, init = _tree(cid)
        tensors.update({f"{cid}/init/{n}": v for n, v in init.items()})
        for k, grads in enumerate(_grads(cid, tree)):
            tensors.update({f"{cid}/grad{k}/{n}": v for n, v in grads.items()})
        opt_cases.append(
            {
                "id": cid,
                "name": name,
                "kwargs": kwargs,
                "params": PARAMS,
                "layer_norms": LAYER_NORMS,
                "frozen": FROZEN,
                "steps": OPT_STEPS,
            }
        )
    sched_cases = [
        {"id": cid, "name": name, "kwargs": kwargs, "optimizer": opt, "optimizer_kwargs": okw, "steps": STEPS}
        for cid, name, kwargs, opt, okw in SCHEDULER_CASES
    ]
    acc_cases = [{"id": cid, "initial": initial, "calls": calls} for cid, initial, calls in ACCUMULATION_CASES]
    scenarios = [
        {**s, "config": MODEL_CONFIG, "tokenizer_dir": str(ROOT / "workers" / "tiny_qwen3")} for s in SCENARIOS
    ]
    specs = {
        "optimizers": {"cases": opt_cases},
        "schedulers": {"cases": sched_cases},
        "accumulation": {"cases": acc_cases},
        "e2e": {"scenarios": scenarios},
    }
    return run_reference(specs, tensors, tmp_path_factory.mktemp("twinkle-ref-optim"), timeout=400)


# ---------------------------------------------------------------------------------------------
# Schedulers, optimizers, accumulation.


def _trace(optimizer: torch.optim.Optimizer, scheduler: Any, steps: int) -> list[list[list[float | None]]]:
    trace = []
    for _ in range(steps):
        trace.append(
            [[g["lr"], float(g["betas"][0]) if "betas" in g else g.get("momentum")] for g in optimizer.param_groups]
        )
        optimizer.step()
        scheduler.step()
    return trace


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cid", "name", "kwargs", "opt", "opt_kwargs"), SCHEDULER_CASES, ids=[c[0] for c in SCHEDULER_CASES]
)
def test_scheduler_matches_twinkle(
    cid: str, name: str, kwargs: dict, opt: str, opt_kwargs: dict, ref: Reference
) -> None:
    tree = module_tree([("w", [2]), ("b.bias", [2])], [])
    optimizer = build_optimizer(opt, tree.named_parameters(), **opt_kwargs)
    ours = _trace(optimizer, build_scheduler(name, optimizer, **kwargs), STEPS)
    theirs = ref.json["schedulers"][cid]["trace"]
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs)):
        flat_a, flat_b = [x for g in a for x in g], [x for g in b for x in g]
        assert flat_a == pytest.approx(flat_b, rel=1e-12, abs=1e-15), f"step {step}"


def test_every_scheduler_is_covered() -> None:
    assert {c[1] for c in SCHEDULER_CASES} == set(SCHEDULERS)
    assert {c[1] for c in OPTIMIZER_CASES} == set(OPTIMIZERS)


@pytest.mark.slow
@pytest.mark.parametrize(("cid", "name", "kwargs"), OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_optimizer_groups_and_steps_match_twinkle(cid: str, name: str, kwargs: dict, ref: Reference) -> None:
    tree, _ = _tree(cid)
    optimizer = build_optimizer(name, tree.named_parameters(), layer_norm_param_names(tree), **kwargs)
    groups = [
        {"names": g["param_names"], "weight_decay": g["weight_decay"], "lr": g["lr"]} for g in optimizer.param_groups
    ]
    assert groups == ref.json["optimizers"][cid]["groups"]
    named = dict(tree.named_parameters())
    for k, grads in enumerate(_grads(cid, tree)):
        for n, grad in grads.items():
            named[n].grad = grad.clone()
        optimizer.step()
        for n, p in named.items():
            torch.testing.assert_close(p.detach(), ref.tensor("optimizers", f"{cid}/step{k}/{n}"), rtol=1e-6, atol=1e-7)


def test_no_decay_names() -> None:
    exempt = {n for n, _ in PARAMS if is_no_decay(n)}
    assert exempt == {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.A.bias",
        "base_model.model.model.layers.0.input_layernorm.weight",
        "base_model.model.model.layers.0.self_attn.q_norm.weight",
        "base_model.model.model.norm.weight",
        "base_model.model.model.final_RMSNorm.weight",
        "base_model.model.model.unbiased.lora_A.A.weight",
    }
    tree, _ = _tree("names")
    assert layer_norm_param_names(tree) == {"base_model.model.model.ln_f.weight", "base_model.model.model.ln_f.bias"}


@pytest.mark.slow
@pytest.mark.parametrize(("cid", "initial", "calls"), ACCUMULATION_CASES, ids=[c[0] for c in ACCUMULATION_CASES])
def test_accumulation_syncs_match_twinkle(cid: str, initial: int, calls: list[int | None], ref: Reference) -> None:
    acc = GradientAccumulator(gradient_accumulation_steps=initial)
    assert [acc.add_backward(gas) for gas in calls] == ref.json["accumulation"][cid]["syncs"]


# ---------------------------------------------------------------------------------------------
# Whole training loops, replayed.


@dataclass
class Replay:
    """Our side of one scenario: the adapter's parameters and every native-API object."""

    names: list[str]
    params: list[torch.nn.Parameter]
    acc: GradientAccumulator
    loss: Any = field(default_factory=default_loss)
    optimizer: Any = None
    scheduler: Any = None
    metrics: MetricAccumulator = field(default_factory=lambda: MetricAccumulator(clock=lambda: 0.0))

    def ctx(self) -> MetricContext:
        return self.acc.metric_context(self.optimizer, self.loss.reduction)


def _padded_labels(inputs: list[dict[str, list[int]]]) -> torch.Tensor:
    width = max(len(x["labels"]) for x in inputs)
    return torch.tensor([x["labels"] + [-100] * (width - len(x["labels"])) for x in inputs])


def _replay_fb(r: Replay, op: dict, result: dict, key: str, ref: Reference) -> None:
    labels = _padded_labels(op["inputs"])
    logps = ref.tensor("e2e", f"{key}/logps")
    record = ForwardRecord(label_tokens=int((labels >= 0).sum()))
    if f"e2e:{key}/predicted" in ref.tensors:
        record.correct, record.total = accuracy_counts(ref.tensor("e2e", f"{key}/predicted"), labels)
    r.metrics.forward(r.ctx(), record)
    kwargs = op["kwargs"]
    inputs = r.loss.prepare(labels, {k: v for k, v in kwargs.items() if k not in MODEL_KWARGS})
    out = r.loss(logps, labels, inputs)
    assert float(out.loss) == pytest.approx(result["loss"], rel=1e-5)
    r.acc.add_loss(out.num_tokens)
    r.metrics.add_loss(float(out.loss), out.num_tokens)
    for name, p in zip(r.names, r.params):
        delta = ref.tensor("e2e", f"{key}/delta/{name}").to(p.dtype)
        p.grad = delta if p.grad is None else p.grad + delta
    r.acc.add_backward(kwargs.get("gradient_accumulation_steps"))


def _replay_step(r: Replay, op: dict, result: dict, key: str, ref: Reference) -> None:
    r.acc.clip_grad_and_step(r.params, r.optimizer, r.scheduler, **op["kwargs"])
    assert r.acc.last_grad_norm == pytest.approx(result["grad_norm"], rel=1e-5)
    assert current_lrs(r.optimizer) == pytest.approx(result["lrs"], rel=1e-12)
    for name, p in zip(r.names, r.params):
        torch.testing.assert_close(p.detach(), ref.tensor("e2e", f"{key}/param/{name}"), rtol=1e-5, atol=1e-6)


TIME_KEYS = {"total time elapse", "speed"}


def _replay_metric(r: Replay, result: dict) -> None:
    ours, theirs = r.metrics.calculate(r.ctx()), result["metric"]
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        if key == "grad_norm":
            assert float(ours[key]) == pytest.approx(float(value), rel=1e-5)
        elif key not in TIME_KEYS:
            assert ours[key] == value, key


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s["id"] for s in SCENARIOS])
def test_training_loop_matches_twinkle(scenario: dict, ref: Reference) -> None:
    sid, theirs = scenario["id"], ref.json["e2e"][scenario["id"]]
    names = theirs["param_names"]
    params = [torch.nn.Parameter(ref.tensor("e2e", f"{sid}/init/{n}").clone()) for n in names]
    r = Replay(names, params, GradientAccumulator(**scenario["adapter_kwargs"]))
    for i, (op, result) in enumerate(zip(scenario["ops"], theirs["ops"])):
        key = f"{sid}/op{i}"
        if op["op"] == "set_loss":
            r.loss = build_loss(op["name"], **op["kwargs"])
        elif op["op"] == "set_optimizer":
            r.optimizer = build_optimizer(op["name"], zip(names, params), **op["kwargs"])
            groups = [{"names": g["param_names"], "weight_decay": g["weight_decay"]} for g in r.optimizer.param_groups]
            assert groups == result["groups"]
        elif op["op"] == "set_lr_scheduler":
            r.scheduler = build_scheduler(op["name"], r.optimizer, **op["kwargs"])
        elif op["op"] == "fb":
            _replay_fb(r, op, result, key, ref)
        elif op["op"] == "step":
            _replay_step(r, op, result, key, ref)
        else:
            _replay_metric(r, result)


# ---------------------------------------------------------------------------------------------
# Metrics on their own (the clock-dependent keys), and bad input.


def test_metric_time_keys_and_reset() -> None:
    now = [100.0]
    m = MetricAccumulator(clock=lambda: now[0])
    ctx = MetricContext(lrs=[1e-3, 1e-3], step=7, gradient_accumulation_steps=2, grad_norm=0.5, loss_reduction="mean")
    m.forward(ctx, ForwardRecord(label_tokens=4, loss=2.0, num_tokens=0.0))
    now[0] = 130.0
    out = m.calculate(ctx)
    assert out == {
        "loss": "2.0000",
        "grad_norm": "0.500000",
        "learning rate(param group 1)": "1.000000e-03",
        "learning rate(param group 2)": "1.000000e-03",
        "iters": 3,
        "total time elapse": "30 seconds",
        "speed": "0.12 iters/s",
    }
    now[0] = 230.0  # over a minute since the last call: minutes, counted from the start
    out = m.calculate(MetricContext([5e-4], 9, 1, 0.0, "sum"))
    # Nothing accumulated since: the learning rates and iters of the last forward stay.
    assert out["loss"] == "0.0000" and "grad_norm" not in out and out["learning rate(param group 2)"] == "1.000000e-03"
    assert out["total time elapse"] == "2.2 minutes" and out["iters"] == 3 and out["speed"] == "0.00 iters/s"


def test_unknown_names_list_the_allowed_ones() -> None:
    tree = module_tree([("w", [2])], [])
    with pytest.raises(UnknownNativeName) as e:
        build_optimizer("RMSprop", tree.named_parameters())
    assert e.value.field == "optimizer_cls" and all(n in str(e.value) for n in OPTIMIZERS)
    opt = build_optimizer("AdamW", tree.named_parameters())
    for name in ("LambdaLR", "ReduceLROnPlateau", "SequentialLR", "LRScheduler", "cosine"):
        with pytest.raises(UnknownNativeName) as e:
            build_scheduler(name, opt)
        assert e.value.field == "scheduler_cls" and all(n in str(e.value) for n in SCHEDULERS)


@pytest.mark.parametrize(
    ("name", "kwargs", "field_name"),
    [
        ("AdamW", {"lr": -1e-3}, "lr"),
        ("AdamW", {"betas": [0.9, 0.99, 0.9]}, "betas"),
        ("AdamW", {"betas": [0.9, 1.0]}, "betas"),
        ("AdamW", {"fused": True}, "fused"),
        ("AdamW", {"params": []}, "params"),
        ("AdamW", {"extra_no_decay": ["w"]}, "extra_no_decay"),  # ours, positional-only
        ("AdamW", {"name": "SGD"}, "name"),
        ("Adam", {"eps": "tiny"}, "eps"),
        ("SGD", {"nesterov": True}, "nesterov"),
        ("SGD", {"momentum": math.inf}, "momentum"),
        ("SGD", {"lr": None}, "lr"),
    ],
)
def test_bad_optimizer_arguments_name_the_field(name: str, kwargs: dict, field_name: str) -> None:
    tree = module_tree([("w", [2])], [])
    with pytest.raises(NativeArgError) as e:
        build_optimizer(name, tree.named_parameters(), **kwargs)
    assert e.value.field == field_name and str(e.value).startswith(field_name + ":")


@pytest.mark.parametrize(
    ("name", "kwargs", "field_name"),
    [
        ("CosineWarmupScheduler", {"num_training_steps": 10}, "num_warmup_steps"),
        ("CosineWarmupScheduler", {"num_warmup_steps": 1.5, "num_training_steps": 10}, "num_warmup_steps"),
        ("StepLR", {"step_size": 0}, "step_size"),
        ("StepLR", {"step_size": 2, "last_epoch": 3}, "last_epoch"),
        ("StepLR", {"step_size": 2, "optimizer": None}, "optimizer"),
        ("MultiStepLR", {"milestones": 5}, "milestones"),
        ("LinearLR", {"start_factor": 0.0}, "start_factor"),
        ("CyclicLR", {"base_lr": 0.1, "max_lr": 0.2, "scale_fn": "x"}, "scale_fn"),
        ("CyclicLR", {"base_lr": 0.1, "max_lr": 0.2, "mode": "sine"}, "mode"),
        ("OneCycleLR", {"max_lr": 0.1, "epochs": 3}, "total_steps"),
    ],
)
def test_bad_scheduler_arguments_name_the_field(name: str, kwargs: dict, field_name: str) -> None:
    opt = build_optimizer("AdamW", module_tree([("w", [2])], []).named_parameters())
    with pytest.raises(NativeArgError) as e:
        build_scheduler(name, opt, **kwargs)
    assert e.value.field == field_name and str(e.value).startswith(field_name + ":")


def test_torch_cross_argument_errors_become_native_errors() -> None:
    # CyclicLR cycles momentum by default: an optimizer without one is refused, naming the class.
    tree = module_tree([("w", [2])], [])
    opt = torch.optim.Adagrad(tree.parameters())
    with pytest.raises(NativeArgError) as e:
        build_scheduler("CyclicLR", opt, base_lr=0.1, max_lr=0.2)
    assert e.value.field == "scheduler_cls"


def test_bad_accumulation_and_clip_arguments_name_the_field() -> None:
    acc, p = GradientAccumulator(), torch.nn.Parameter(torch.ones(2))
    for call, field_name in [
        (lambda: acc.add_backward(0), "gradient_accumulation_steps"),
        (lambda: acc.should_sync("2"), "gradient_accumulation_steps"),
        (lambda: acc.clip_grad_norm([p], max_grad_norm=-1.0), "max_grad_norm"),
        (lambda: acc.clip_grad_norm([p], norm_type="two"), "norm_type"),
        (lambda: apply_optim_params(torch.optim.SGD([p]), {"lr": 0.1}), "optim_params"),
        (lambda: apply_optim_params(torch.optim.AdamW([p]), {"weight_decay": 0.1}), "lr"),
        (lambda: apply_optim_params(torch.optim.AdamW([p]), {"lr": 0.1, "momentum": 0.9}), "momentum"),
        (lambda: acc.clip_grad_and_step([p], None, None), "optimizer_cls"),
        (lambda: build_scheduler("StepLR", None, step_size=1), "optimizer_cls"),
    ]:
        with pytest.raises(NativeArgError) as e:
            call()
        assert e.value.field == field_name


def test_optim_params_keep_the_no_decay_group() -> None:
    tree = module_tree([("w", [2]), ("b.bias", [2])], [])
    opt = build_optimizer("AdamW", tree.named_parameters(), lr=1e-3)
    apply_optim_params(opt, {"lr": 5e-4, "weight_decay": 0.3, "betas": [0.5, 0.9], "eps": 1e-6})
    assert [(g["lr"], g["weight_decay"], g["betas"], g["eps"]) for g in opt.param_groups] == [
        (5e-4, 0.3, (0.5, 0.9), 1e-6),
        (5e-4, 0.0, (0.5, 0.9), 1e-6),
    ]


def test_clip_divides_by_the_accumulated_tokens() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    acc = GradientAccumulator()
    acc.add_loss(3.0)
    acc.add_loss(0.0)  # a mean loss counts as one
    p.grad = torch.tensor([8.0, 0.0])
    assert acc.clip_grad_norm([p], max_grad_norm=10.0) == pytest.approx(2.0)
    assert acc.num_tokens == 0.0 and torch.equal(p.grad, torch.tensor([2.0, 0.0]))
    assert GradientAccumulator(gradient_accumulation_steps=2).clip_grad_norm([p]) is None  # a micro-step
