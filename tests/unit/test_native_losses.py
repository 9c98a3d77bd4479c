"""The native Twinkle losses (workers/native_losses.py) against twinkle-kit 0.5.1's own classes.

Every accepted loss name runs on random padded batches in float64 and float32, with the per-call
inputs in the forms the wire carries (one advantage per sequence, ragged response-only old_logps,
full-width ref_logps, tensors); values, gradients and num_tokens must match twinkle's within 1e-5.
The reference runs in one subprocess of the twinkle-kit venv (tests/support/twinkle_ref.py): the
parity tests skip without it. The error tests at the end need no reference.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tests.support.twinkle_ref import Reference, run_reference
from workers.native_args import NativeArgError, UnknownNativeName
from workers.native_losses import (
    NATIVE_LOSSES,
    BatchTotals,
    LossInputs,
    NativeLossInputError,
    align_to_mask,
    build_loss,
    default_loss,
    token_entropy,
)

B, T = 6, 7  # an even batch: the preference losses read it as 3 (chosen, rejected) pairs


@dataclass
class Case:
    id: str
    loss: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    call: dict[str, Any] = field(default_factory=dict)  # forward_backward kwargs, built per case
    dtype: torch.dtype = torch.float64
    entropy: bool = False
    mse: bool = False


def _gen(cid: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(cid.encode()))


def _labels(g: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, 50, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    labels[:, -1] = -100  # next-token aligned: nothing is predicted after the last token
    labels[1, :2] = 5  # every sequence trains something...
    labels[4, :] = -100  # ...but one (a rejected one, for the pair losses) trains nothing
    return labels


def _rl_call(g: torch.Generator, labels: torch.Tensor, logps: torch.Tensor, form: str) -> dict[str, Any]:
    mask = labels != -100
    old = logps + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    if form == "tensors":
        return {"advantages": torch.randn(B, T, generator=g, dtype=torch.float64), "old_logps": old, "ref_logps": ref}
    return {
        "advantages": adv.tolist(),  # one per sequence
        "old_logps": [old[i][mask[i]].tolist() for i in range(B)],  # response-only, ragged
        "ref_logps": [ref[i].tolist() + [0.0, 0.0] for i in range(B)],  # full width, right-padded
    }


def _cases() -> list[Case]:
    rl = [
        ("GRPOLoss", {}),
        ("GRPOLoss", {"epsilon": 0.1, "epsilon_high": 0.3, "beta": 0.05}),
        ("PPOLoss", {"beta": 0.1}),
        ("PPOLoss", {"loss_agg_mode": "seq-mean-token-mean", "epsilon": 0.15}),
        ("GSPOLoss", {"beta": 0.02}),
        ("CISPOLoss", {}),
        ("CISPOLoss", {"epsilon": 0.5}),
    ]
    cases = [
        Case("ce", "CrossEntropyLoss"),
        Case("ce_sum", "CrossEntropyLoss", {"reduction": "sum"}),
        Case("ce_dft", "CrossEntropyLoss", {"dft": True}),
        Case("ce_sum_dft", "CrossEntropyLoss", {"reduction": "sum", "dft": True}),
        Case("mse", "MSELoss", mse=True),
        Case("dpo", "DPOLoss", call={"ref_logps": "tensor"}),
        Case(
            "dpo_smooth",
            "DPOLoss",
            {"beta": 0.5, "label_smoothing": 0.2, "sft_weight": 0.5},
            call={"ref_logps": "list"},
        ),
        Case("dpo_hinge", "DPOLoss", {"loss_type": "hinge"}, call={"ref_logps": "wide"}),
        Case("dpo_ipo", "DPOLoss", {"loss_type": "ipo", "beta": 0.3}, call={"ref_sums": True}),
        Case("dpo_kto", "DPOLoss", {"loss_type": "kto_pair"}, call={"ref_logps": "tensor"}),
        Case("dpo_free", "DPOLoss", {"reference_free": True}),
        Case("dpo_noref", "DPOLoss"),
        Case("simpo", "SimPOLoss"),
        Case("simpo_b", "SimPOLoss", {"beta": 1.0, "gamma": 0.2}),
        Case("cpo", "CPOLoss"),
        Case("cpo_b", "CPOLoss", {"beta": 0.3, "bc_coef": 0.5}),
        Case("orpo", "ORPOLoss"),
        Case("orpo_b", "ORPOLoss", {"lambda_orpo": 0.5}),
        Case("grpo_entropy", "GRPOLoss", {"entropy_coef": 0.01, "beta": 0.04}, call={"rl": "lists"}, entropy=True),
        Case("grpo_onpolicy", "GRPOLoss", call={"rl": "advantages_only"}),
        Case("grpo_noadv", "GRPOLoss", call={"rl": "none"}),
        Case("cispo_items", "CISPOLoss", call={"rl": "lists", "num_items_in_batch": 11.0}),
    ]
    for i, (name, kwargs) in enumerate(rl):
        for form in ("lists", "tensors"):
            cases.append(Case(f"{name}_{i}_{form}", name, kwargs, call={"rl": form}))
    return cases + [
        _float32(c) for c in cases if c.id in ("ce", "ce_sum_dft", "GRPOLoss_1_lists", "dpo_smooth", "orpo", "mse")
    ]


def _float32(case: Case) -> Case:
    return Case(case.id + "_f32", case.loss, case.kwargs, dict(case.call), torch.float32, case.entropy, case.mse)


CASES = _cases()


@dataclass
class Built:
    """A case's tensors and its per-call kwargs (the same values for both sides)."""

    labels: torch.Tensor
    leaves: dict[str, torch.Tensor]  # differentiable inputs: logps (+ entropies) or logits
    call: dict[str, Any]


def _build(case: Case) -> Built:
    g = _gen(case.id)
    if case.mse:
        preds = torch.randn(B, 3, generator=g, dtype=torch.float64)
        return Built(
            torch.randn(B, 3, generator=g, dtype=torch.float64).to(case.dtype), {"logits": preds.to(case.dtype)}, {}
        )
    labels = _labels(g)
    # logps near 0 in one chosen row, so that ORPO's log(1 - p) takes both of its branches.
    logps = -3 * torch.rand(B, T, generator=g, dtype=torch.float64) - 1e-3
    logps[2] *= 0.05
    leaves = {"logps": logps}
    if case.entropy:
        leaves["entropies"] = 3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    call = _call(case, g, labels, logps)
    leaves = {k: v.to(case.dtype) for k, v in leaves.items()}
    return Built(labels, leaves, call)


def _call(case: Case, g: torch.Generator, labels: torch.Tensor, logps: torch.Tensor) -> dict[str, Any]:
    spec, call = case.call, {}
    if "rl" in spec:
        full = _rl_call(g, labels, logps, "tensors" if spec["rl"] == "tensors" else "lists")
        if spec["rl"] == "advantages_only":
            full = {"advantages": full["advantages"]}
        call = {} if spec["rl"] == "none" else full
    if "num_items_in_batch" in spec:
        call["num_items_in_batch"] = spec["num_items_in_batch"]
    ref = logps + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    form = spec.get("ref_logps")
    if form == "tensor":
        call["ref_logps"] = ref
    elif form == "list":
        call["ref_logps"] = ref.tolist()
    elif form == "wide":  # longer than the batch: the right part is dropped
        call["ref_logps"] = torch.cat([ref, torch.zeros(B, 3, dtype=torch.float64)], dim=1)
    if spec.get("ref_sums"):
        sums = -10 * torch.rand(B, generator=g, dtype=torch.float64)
        call["ref_chosen_logps"], call["ref_rejected_logps"] = sums[0::2], sums[1::2]
    return call


def _to_wire(cid: str, call: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out = {}
    for k, v in call.items():
        if isinstance(v, torch.Tensor):
            tensors[f"{cid}/call/{k}"] = v
            out[k] = f"@{cid}/call/{k}"
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    tensors: dict[str, torch.Tensor] = {}
    loss_cases = []
    for case in CASES:
        built = _build(case)
        tensors[f"{case.id}/labels"] = built.labels
        tensors.update({f"{case.id}/{k}": v for k, v in built.leaves.items()})
        loss_cases.append(
            {
                "id": case.id,
                "loss": case.loss,
                "kwargs": case.kwargs,
                "call": _to_wire(case.id, built.call, tensors),
                "grad_inputs": list(built.leaves),
            }
        )
    align_cases = _align_cases(tensors)
    for cid, dtype in (("e64", torch.float64), ("e32", torch.float32)):
        g = _gen(cid)
        tensors[f"{cid}/logits"] = (4 * torch.randn(3, 5, 40, generator=g, dtype=torch.float64)).to(dtype)
        tensors[f"{cid}/index"] = torch.randint(0, 40, (3, 5), generator=g)
    specs = {"losses": {"cases": loss_cases}, "align": {"cases": align_cases}, "entropy": {"cases": ["e64", "e32"]}}
    return run_reference(specs, tensors, tmp_path_factory.mktemp("twinkle-ref-losses"))


def _close(ours: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype) -> None:
    # float64 is held to 1e-7, not 1e-9: twinkle turns a JSON list of DPO ref_logps into float32 first.
    tol = 1e-5 if dtype == torch.float32 else 1e-7
    torch.testing.assert_close(ours.detach().to(theirs.dtype), theirs, rtol=tol, atol=tol)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_matches_twinkle(case: Case, ref: Reference) -> None:
    built = _build(case)
    loss = build_loss(case.loss, **case.kwargs)
    leaves = {k: v.clone().requires_grad_(True) for k, v in built.leaves.items()}
    if case.mse:
        result = loss(None, built.labels, predictions=leaves["logits"])
    else:
        inputs = loss.prepare(built.labels, built.call)
        result = loss(leaves["logps"], built.labels, inputs, entropies=leaves.get("entropies"))
    result.loss.backward()
    _close(result.loss.reshape(1), ref.tensor("losses", f"{case.id}/loss"), case.dtype)
    for k, leaf in leaves.items():
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        _close(grad, ref.tensor("losses", f"{case.id}/grad_{k}"), case.dtype)
    assert result.num_tokens == ref.json["losses"][case.id]["num_tokens"]


def test_every_allowed_name_is_covered() -> None:
    assert {c.loss for c in CASES} == set(NATIVE_LOSSES)


# ---------------------------------------------------------------------------------------------
# Alignment of per-token inputs (twinkle's GRPOLoss._pad_and_align_to_batch) and entropy.

ALIGN_FORMS = [
    "scalars",
    "scalar_tensor",
    "column",
    "response_only",
    "full_width",
    "longer",
    "single",
    "rect_tensor",
    "mixed",
]


def _align_value(form: str, labels: torch.Tensor, g: torch.Generator) -> Any:
    mask = labels != -100
    rows = torch.randn(B, T + 3, generator=g, dtype=torch.float64)
    return {
        "scalars": rows[:, 0].tolist(),
        "scalar_tensor": rows[:, 0],
        "column": rows[:, :1],
        "response_only": [rows[i, : int(mask[i].sum())].tolist() for i in range(B)],
        "full_width": rows[:, :T].tolist(),
        "longer": [rows[i, : T + i % 3].tolist() for i in range(B)],
        "single": [[float(rows[i, 0])] for i in range(B)],
        "rect_tensor": rows[:, :T],
        "mixed": [float(rows[0, 0])] + [rows[i, :T].tolist() for i in range(1, B)],
    }[form]


def _align_cases(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    cases = []
    for form in ALIGN_FORMS:
        g = _gen("align_" + form)
        labels = _labels(g)
        tensors[f"align_{form}/labels"] = labels
        cases.append(
            {
                "id": f"align_{form}",
                "value": _to_wire(f"align_{form}", {"v": _align_value(form, labels, g)}, tensors)["v"],
            }
        )
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("form", ALIGN_FORMS)
def test_alignment_matches_twinkle(form: str, ref: Reference) -> None:
    g = _gen("align_" + form)
    labels = _labels(g)
    ours = align_to_mask("advantages", _align_value(form, labels, g), labels != -100)
    theirs = ref.tensor("align", f"align_{form}")
    mask = labels != -100
    # Twinkle passes a [B, T] tensor through as it is; on the trained positions both agree.
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=0)
    assert (ours[~mask] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("cid", ["e64", "e32"])
def test_token_entropy_matches_twinkle(cid: str, ref: Reference) -> None:
    g = _gen(cid)
    dtype = torch.float64 if cid == "e64" else torch.float32
    logits = (4 * torch.randn(3, 5, 40, generator=g, dtype=torch.float64)).to(dtype)
    _close(token_entropy(logits), ref.tensor("entropy", f"{cid}/entropy"), dtype)


# ---------------------------------------------------------------------------------------------
# Passes: a batch split in row passes with the whole batch's totals adds up to the batch.


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == torch.float64 and not c.mse], ids=lambda c: c.id)
def test_row_passes_add_up_to_the_batch(case: Case) -> None:
    built = _build(case)
    loss = build_loss(case.loss, **case.kwargs)
    inputs = loss.prepare(built.labels, built.call)
    ent = built.leaves.get("entropies")
    whole_lp = built.leaves["logps"].clone().requires_grad_(True)
    whole = loss(whole_lp, built.labels, inputs, entropies=ent)
    whole.loss.backward()
    part_lp = built.leaves["logps"].clone().requires_grad_(True)
    totals, total = BatchTotals.of(built.labels), 0.0
    for start, stop in ((0, 2), (2, 6)):
        part = loss(
            part_lp[start:stop],
            built.labels[start:stop],
            inputs.rows(start, stop),
            entropies=None if ent is None else ent[start:stop],
            totals=totals,
        )
        part.loss.backward()
        total = total + part.loss.detach()
        assert part.num_tokens == whole.num_tokens
    torch.testing.assert_close(total, whole.loss.detach())
    torch.testing.assert_close(part_lp.grad, whole_lp.grad)


# ---------------------------------------------------------------------------------------------
# Bad input: every error names its field.


def _field(exc: pytest.ExceptionInfo[NativeArgError]) -> str:
    """The error's field, checked to be what its message starts with ("old_logps[1]: ..." too)."""
    assert str(exc.value).split(":")[0].split("[")[0] == exc.value.field
    return exc.value.field


def test_unknown_loss_lists_the_allowed_names() -> None:
    with pytest.raises(UnknownNativeName) as e:
        build_loss("GKDLoss")
    assert isinstance(e.value, ValueError) and _field(e) == "loss_cls"
    for name in NATIVE_LOSSES:
        assert name in str(e.value)
    with pytest.raises(UnknownNativeName):
        build_loss("Loss")  # twinkle's base class: an attribute of twinkle.loss, not a loss


@pytest.mark.parametrize(
    ("name", "kwargs", "field_name", "words"),
    [
        (
            "GRPOLoss",
            {"epsilon_low": 0.2},
            "epsilon_low",
            "allowed: epsilon, epsilon_high, beta, entropy_coef, ignore_index",
        ),
        ("CrossEntropyLoss", {"reduction": "none"}, "reduction", "one of 'mean', 'sum'"),
        ("CrossEntropyLoss", {"dft": 1}, "dft", "true or false"),
        ("CrossEntropyLoss", {"ignore_index": -100.5}, "ignore_index", "integer"),
        ("GRPOLoss", {"epsilon": -0.1}, "epsilon", ">= 0.0"),
        ("GRPOLoss", {"beta": "0.1"}, "beta", "a number"),
        ("GRPOLoss", {"beta": math.nan}, "beta", "finite"),
        ("PPOLoss", {"loss_agg_mode": "seq-mean"}, "loss_agg_mode", "one of"),
        ("DPOLoss", {"loss_type": "robust"}, "loss_type", "one of"),
        ("DPOLoss", {"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing", "sigmoid"),
        ("DPOLoss", {"beta": 0}, "beta", "> 0.0"),
        ("SimPOLoss", {"beta": True}, "beta", "a number"),
        ("MSELoss", {"reduction": "sum"}, "reduction", "allowed: none"),
        ("CrossEntropyLoss", {"name": "GRPOLoss"}, "name", "takes no argument"),
    ],
)
def test_bad_constructor_arguments_name_the_field(name: str, kwargs: dict, field_name: str, words: str) -> None:
    with pytest.raises(NativeArgError) as e:
        build_loss(name, **kwargs)
    assert _field(e) == field_name and words in str(e.value)


def test_defaults_and_json_integers() -> None:
    assert default_loss().reduction == "sum"
    assert build_loss("GRPOLoss", epsilon=1).args["epsilon"] == 1.0
    assert build_loss("CrossEntropyLoss", ignore_index=-1.0).ignore_index == -1
    assert build_loss("GRPOLoss", epsilon_high=None).args["epsilon_high"] is None


LABELS = torch.tensor([[1, 2, -100, -100], [3, 4, 5, -100]])


@pytest.mark.parametrize(
    ("call", "field_name"),
    [
        ({"advantages": [1.0, 2.0, 3.0]}, "advantages"),  # three sequences' worth for two
        ({"advantages": [1.0, math.inf]}, "advantages"),
        ({"old_logps": [[0.1, 0.2, 0.3], [0.1]]}, "old_logps"),  # 3 values for 2 trained positions
        ({"old_logps": [[-0.1, -0.2], ["x", -0.1, -0.1]]}, "old_logps"),
        ({"ref_logps": {"a": 1}}, "ref_logps"),
        ({"advantages": [1.0, 2.0], "rewards": [1.0, 0.0]}, "rewards"),
        ({"advantages": [1.0, 2.0], "num_items_in_batch": 3}, "num_items_in_batch"),  # GRPO does not read it
    ],
)
def test_bad_call_inputs_name_the_field(call: dict, field_name: str) -> None:
    with pytest.raises(NativeLossInputError) as e:
        build_loss("GRPOLoss").prepare(LABELS, call)
    assert _field(e) == field_name


def test_cispo_items_must_be_positive() -> None:
    with pytest.raises(NativeLossInputError) as e:
        build_loss("CISPOLoss").prepare(LABELS, {"advantages": [1.0, 1.0], "num_items_in_batch": 0})
    assert _field(e) == "num_items_in_batch"


@pytest.mark.parametrize(
    ("call", "field_name"),
    [
        ({"ref_logps": [[0.0] * 3, [0.0] * 3]}, "ref_logps"),  # narrower than the batch
        ({"ref_logps": [[0.0] * 4, [0.0] * 5]}, "ref_logps"),  # ragged
        ({"ref_chosen_logps": [-1.0]}, "ref_rejected_logps"),  # one half of the pair sums
        ({"ref_chosen_logps": [-1.0, -2.0], "ref_rejected_logps": [-1.0, -2.0]}, "ref_chosen_logps"),
        ({"advantages": [1.0, 1.0]}, "advantages"),
    ],
)
def test_bad_preference_inputs_name_the_field(call: dict, field_name: str) -> None:
    with pytest.raises(NativeLossInputError) as e:
        build_loss("DPOLoss").prepare(LABELS, call)
    assert _field(e) == field_name


def test_bad_tensors_from_the_trainer_name_the_field() -> None:
    loss, lp = build_loss("GRPOLoss", entropy_coef=0.1), torch.zeros(2, 4)
    cases = [
        (lambda: loss(torch.zeros(2, 3), LABELS), "logps"),
        (lambda: loss(lp, LABELS.float()), "labels"),
        (lambda: loss(lp, LABELS[0]), "labels"),
        (lambda: loss(torch.full((2, 4), math.nan), LABELS), "logps"),
        (lambda: loss(lp, LABELS, LossInputs(), entropies=None), "entropies"),
        (lambda: build_loss("DPOLoss")(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.long)), "labels"),
        (lambda: build_loss("MSELoss")(None, LABELS, predictions=torch.zeros(2, 4, 9)), "labels"),
        (lambda: build_loss("MSELoss")(None, LABELS, predictions=None), "predictions"),
    ]
    for call, field_name in cases:
        with pytest.raises(NativeLossInputError) as e:
            call()
        assert _field(e) == field_name


def test_padding_never_reaches_value_or_gradient() -> None:
    """Non-finite logps where nothing is trained (what a trainer may leave there) change nothing."""
    call = {"advantages": [1.0, -0.5], "old_logps": [[-1.0, -1.2], [-0.5, -0.7, -2.0]]}
    for name in NATIVE_LOSSES:
        if name == "MSELoss":
            continue
        loss = build_loss(name)
        inputs = loss.prepare(LABELS, {k: v for k, v in call.items() if k in loss.spec.call_inputs})
        clean = torch.full((2, 4), -1.0, requires_grad=True)
        poisoned = torch.tensor([[-1.0, -1.0, math.inf, math.nan], [-1.0, -1.0, -1.0, -math.inf]], requires_grad=True)
        a, b = loss(clean, LABELS, inputs), loss(poisoned, LABELS, inputs)
        a.loss.backward()
        b.loss.backward()
        assert torch.equal(a.loss, b.loss) and torch.equal(clean.grad, poisoned.grad), name
