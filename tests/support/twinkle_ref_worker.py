"""The reference side of the native-API parity tests: runs twinkle-kit 0.5.1's own classes.

Run by tests/support/twinkle_ref.py with the reference venv's python (never the project's):

    <ref python> twinkle_ref_worker.py WORKDIR

It reads WORKDIR/spec.json ({job name: job spec}) and WORKDIR/in.safetensors, runs each job with
twinkle's classes and writes WORKDIR/out.json ({job name: its JSON}) and WORKDIR/out.safetensors
(each job's tensors under "<job>:<key>"). Only the `job_*` functions import twinkle; the
module-level helpers are plain torch, so the project's tests import them too (`module_tree`).
A value "@key" in a spec stands for the tensor `key` of in.safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch


def module_tree(
    names_shapes: list[tuple[str, list[int]]], layer_norms: list[str], frozen: list[str] = ()
) -> torch.nn.Module:
    """A module tree with a parameter at each dotted name; the `layer_norms` paths are
    torch.nn.LayerNorm modules (their weight and bias appear under them); `frozen` names do not
    require grad."""
    root = torch.nn.Module()
    for path in layer_norms:
        parent, leaf = _parent(root, path)
        parent.add_module(leaf, torch.nn.LayerNorm(4))
    for name, shape in names_shapes:
        parent, leaf = _parent(root, name)
        if not hasattr(parent, leaf):
            parent.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    for name, p in root.named_parameters():
        p.requires_grad_(name not in frozen)
    return root


def _parent(root: torch.nn.Module, dotted: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = dotted.split(".")
    node = root
    for part in path:
        if not hasattr(node, part):
            node.add_module(part, torch.nn.Module())
        node = getattr(node, part)
    return node, leaf


def _resolve(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        return tensors[value[1:]].clone()
    if isinstance(value, dict):
        return {k: _resolve(v, tensors) for k, v in value.items()}
    return value


def _number(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


# ---------------------------------------------------------------------------------------------


def job_losses(spec: dict, tensors: dict) -> tuple[dict, dict]:
    import twinkle.loss
    from twinkle.loss import Loss
    from twinkle.utils import construct_class

    out_json, out_t = {}, {}
    for case in spec["cases"]:
        cid = case["id"]
        loss = construct_class(case["loss"], Loss, twinkle.loss, **case["kwargs"])
        leaves = {k: tensors[f"{cid}/{k}"].clone().requires_grad_(True) for k in case["grad_inputs"]}
        outputs = dict(leaves)
        inputs = {"labels": tensors[f"{cid}/labels"]}
        result = loss(inputs, outputs, **_resolve(case["call"], tensors))
        result["loss"].backward()
        out_t[f"{cid}/loss"] = result["loss"].detach().reshape(1)
        for k, leaf in leaves.items():
            out_t[f"{cid}/grad_{k}"] = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        out_json[cid] = {"num_tokens": _number(result.get("num_tokens", 0))}
    return out_json, out_t


def job_align(spec: dict, tensors: dict) -> tuple[dict, dict]:
    from twinkle.loss import GRPOLoss

    loss, out_json, out_t = GRPOLoss(), {}, {}
    for case in spec["cases"]:
        mask = tensors[f"{case['id']}/labels"] != -100
        try:
            out_t[case["id"]] = loss._pad_and_align_to_batch(
                _resolve(case["value"], tensors), mask, "cpu", torch.float64
            )
        except Exception as e:  # noqa: BLE001 - recorded for the test to compare
            out_json[case["id"]] = {"error": f"{type(e).__name__}: {e}"}
    return out_json, out_t


def job_entropy(spec: dict, tensors: dict) -> tuple[dict, dict]:
    from twinkle.utils.torch_utils import selective_log_softmax

    out_t = {}
    for cid in spec["cases"]:
        logps, entropy = selective_log_softmax(tensors[f"{cid}/logits"], tensors[f"{cid}/index"], return_entropy=True)
        out_t[f"{cid}/logps"], out_t[f"{cid}/entropy"] = logps, entropy
    return {}, out_t


def _fake_model_group(tree: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """TransformersModel._create_param_group on a stand-in `self` holding `tree`."""
    from twinkle.model.transformers.transformers import TransformersModel

    class Stand:
        model = tree

        def _get_trainable_parameters(self, adapter_name: str) -> dict:
            return {n: p for n, p in tree.named_parameters() if p.requires_grad}

    return TransformersModel._create_param_group(Stand(), "A", lr=lr, weight_decay=weight_decay)


def _twinkle_optimizer(tree: torch.nn.Module, name: str, kwargs: dict) -> torch.optim.Optimizer:
    # As TransformersModel.set_optimizer: groups from lr / weight_decay (or Twinkle's defaults),
    # then the class by name with every kwarg.
    from twinkle.utils import construct_class

    groups = _fake_model_group(tree, kwargs.get("lr", 1e-5), kwargs.get("weight_decay", 0.01))
    return construct_class(name, torch.optim.Optimizer, torch.optim, params=groups, **kwargs)


def job_optimizers(spec: dict, tensors: dict) -> tuple[dict, dict]:
    out_json, out_t = {}, {}
    for case in spec["cases"]:
        cid = case["id"]
        tree = module_tree(case["params"], case["layer_norms"], case["frozen"])
        named = dict(tree.named_parameters())
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(tensors[f"{cid}/init/{n}"])
        opt = _twinkle_optimizer(tree, case["name"], case["kwargs"])
        out_json[cid] = {
            "groups": [
                {"names": g["param_names"], "weight_decay": g["weight_decay"], "lr": g["lr"]} for g in opt.param_groups
            ]
        }
        for k in range(case["steps"]):
            for n, p in named.items():
                if p.requires_grad:
                    p.grad = tensors[f"{cid}/grad{k}/{n}"].clone()
            opt.step()
            for n, p in named.items():
                out_t[f"{cid}/step{k}/{n}"] = p.detach().clone()
    return out_json, out_t


def job_schedulers(spec: dict, tensors: dict) -> tuple[dict, dict]:
    import twinkle.module.scheduler
    from torch.optim.lr_scheduler import LRScheduler
    from twinkle.utils import construct_class

    out_json = {}
    for case in spec["cases"]:
        tree = module_tree([("w", [2]), ("b.bias", [2])], [])
        opt = _twinkle_optimizer(tree, case["optimizer"], case["optimizer_kwargs"])
        # As TransformersModel.set_lr_scheduler.
        sched = construct_class(
            case["name"],
            LRScheduler,
            [torch.optim.lr_scheduler, twinkle.module.scheduler],
            optimizer=opt,
            **case["kwargs"],
        )
        trace = []
        for _ in range(case["steps"]):
            trace.append([[g["lr"], _momentum(g)] for g in opt.param_groups])
            opt.step()
            sched.step()
        out_json[case["id"]] = {"trace": trace}
    return out_json, {}


def _momentum(group: dict) -> float | None:
    if "betas" in group:
        return float(group["betas"][0])
    return float(group["momentum"]) if "momentum" in group else None


def job_accumulation(spec: dict, tensors: dict) -> tuple[dict, dict]:
    from twinkle.model.optimizer_group import BaseOptimizerGroup

    out = {}
    for case in spec["cases"]:
        group = BaseOptimizerGroup(gradient_accumulation_steps=case["initial"])
        syncs = []
        for gas in case["calls"]:
            group.cur_step += 1
            syncs.append(group.do_grad_sync(gas))
        out[case["id"]] = {"syncs": syncs}
    return out, {}


# ---------------------------------------------------------------------------------------------
# A whole training loop through twinkle's TransformersModel on a tiny random Qwen3 (CPU).


def job_e2e(spec: dict, tensors: dict) -> tuple[dict, dict]:
    out_json: dict[str, Any] = {}
    out_t: dict[str, torch.Tensor] = {}
    for scenario in spec["scenarios"]:
        sid = scenario["id"]
        model = _tiny_model(scenario)
        params = model._get_trainable_parameters("A")
        record: dict[str, torch.Tensor] = {f"init/{n}": p.detach().clone() for n, p in params.items()}
        ops = [_run_op(model, op, i, params, tensors, record) for i, op in enumerate(scenario["ops"])]
        out_json[sid] = {"param_names": list(params), "ops": ops}
        out_t.update({f"{sid}/{k}": v for k, v in record.items()})
    return out_json, out_t


def _tiny_model(spec: dict) -> Any:
    import shutil

    from peft import LoraConfig
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from twinkle import Platform
    from twinkle.model.transformers.transformers import TransformersModel

    # Twinkle has no CPU platform: its processor moves inputs to cuda:N. The one patch.
    Platform.get_local_device = staticmethod(lambda *a, **k: "cpu")
    torch.manual_seed(spec["seed"])
    folder = Path.cwd() / f"model-{spec['id']}"  # the worker runs in its work folder
    Qwen3ForCausalLM(Qwen3Config(**spec["config"])).save_pretrained(folder)
    for f in Path(spec["tokenizer_dir"]).iterdir():
        shutil.copy(f, folder)
    model = TransformersModel(model_id=str(folder), mixed_precision="no")
    model.add_adapter_to_model("A", LoraConfig(**spec["lora"]), **spec["adapter_kwargs"])
    return model


def _run_op(model: Any, op: dict, i: int, params: dict, tensors: dict, out_t: dict) -> dict:
    kind, kwargs = op["op"], _resolve(op.get("kwargs", {}), tensors)
    group = model.optimizer_group["A"]
    if kind == "set_loss":
        model.set_loss(op["name"], adapter_name="A", **kwargs)
    elif kind == "set_optimizer":
        model.set_optimizer(op["name"], adapter_name="A", **kwargs)
        return {
            "groups": [
                {"names": g["param_names"], "weight_decay": g["weight_decay"]} for g in group.optimizer.param_groups
            ]
        }
    elif kind == "set_lr_scheduler":
        model.set_lr_scheduler(op["name"], adapter_name="A", **kwargs)
    elif kind == "fb":
        return _forward_backward(model, op, kwargs, i, params, out_t)
    elif kind == "step":
        model.clip_grad_and_step(adapter_name="A", **kwargs)
        for n, p in params.items():
            out_t[f"op{i}/param/{n}"] = p.detach().clone()
        return {"grad_norm": group._last_grad_norm, "lrs": group._get_lr()}
    elif kind == "metric":
        return {"metric": model.calculate_metric(op["is_training"], adapter_name="A")}
    return {}


def _forward_backward(model: Any, op: dict, kwargs: dict, i: int, params: dict, out_t: dict) -> dict:
    before = {n: (p.grad.detach().double().clone() if p.grad is not None else None) for n, p in params.items()}
    out = model.forward_backward(inputs=op["inputs"], adapter_name="A", **kwargs)
    for n, p in params.items():
        after = p.grad.detach().double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
        out_t[f"op{i}/delta/{n}"] = after - (before[n] if before[n] is not None else 0.0)
    out_t[f"op{i}/logps"] = out["logps"].detach().clone()
    if out.get("logits") is not None:
        out_t[f"op{i}/predicted"] = out["logits"].argmax(-1)
    return {"loss": float(out["loss"])}


JOBS = {name[4:]: fn for name, fn in dict(globals()).items() if name.startswith("job_")}


def main() -> None:
    from importlib.metadata import version

    from safetensors.torch import load_file, save_file

    workdir = Path(sys.argv[1])
    specs = json.loads((workdir / "spec.json").read_text())
    tensors = load_file(workdir / "in.safetensors")
    out_json: dict[str, Any] = {"twinkle_kit_version": version("twinkle-kit")}
    out_t: dict[str, torch.Tensor] = {"_": torch.zeros(1)}  # safetensors wants at least one
    for job, spec in specs.items():
        job_json, job_t = JOBS[job](spec, tensors)
        out_json[job] = job_json
        out_t.update({f"{job}:{k}": v.contiguous() for k, v in job_t.items()})
    (workdir / "out.json").write_text(json.dumps(out_json))
    save_file(out_t, workdir / "out.safetensors")


if __name__ == "__main__":
    main()
