"""Server-side custom losses: a safe interpreter for the torch.fx graphs the SDK uploads.

`ServiceClient.create_custom_loss(fn, input_ranks)` traces a per-datum loss
`fn(logprobs, *inputs) -> (loss, metrics)` with torch.fx and sends it as plain data
(`/api/v1/create_custom_loss`, types/custom_loss_graph.py):

    {"format": 1, "nodes": [{"op", "name", "target", "args", "kwargs"}, ...]}

Nodes come in execution order: one `placeholder` per input (`logprobs`, then the `loss_fn_inputs`
keys `fn` reads, in the order of `inputs`), then `call_function` (target = qualified name such
as `torch.exp`, `operator.mul`, `torch.nn.functional.softmax`, `math.sqrt`, or `getattr` for
attribute reads) and `call_method` (target = tensor method name, `args[0]` = the tensor), and one
final `output` whose single argument is `(loss, {metric_key: value})`. Arguments are JSON values
and lists, or one-key objects: `{"ref": node}`, `{"tuple": [...]}`, `{"dict": {...}}`,
`{"slice": [start, stop, step]}`, `{"ellipsis": true}`, `{"float": "inf"|"-inf"|"nan"}`,
`{"dtype": "float32"}`, `{"device": "cpu"}`, `{"layout": "strided"}`,
`{"memory_format": "contiguous_format"}`.

Nothing in a graph is ever looked up by name in Python: `compile_graph` maps each target through
the allow-lists below (FUNCTIONS, METHODS, ATTRIBUTES) and refuses the whole graph otherwise.
Devices in a graph are ignored: every tensor is made on the device of the datum's logprobs.
Runtime guards keep a graph from exhausting the worker: no tensor may exceed
`max(MAX_ELEMENTS, largest input)` elements (checked before the ops that can grow their input:
broadcasting, cat/stack, creation); one datum's live values (those a later node or the output
still needs: the others are freed as soon as their last reader has run) may hold at most 16 times
that; all datums of one call may produce at most CALL_ELEMENTS elements in all and take at most
the call's wall-clock limit (an `EvalBudget`); Python ints stay below 2**62, and sequences below
MAX_SEQUENCE items. Going over any of these is a CustomLossError that names the limit. Integer-tensor indexing is
refused (an out-of-range index is a device-side assert on CUDA, fatal for the process); use
`torch.gather`, whose indices are range-checked here.

Contract (the SDK's, custom_loss.py `run_loss_handle`): the loss runs once per datum with
`logprobs` (the datum's target-token logprobs, shaped like its `target_tokens`: [T] or [T, K])
and each named `loss_fn_inputs` tensor (its own dtype, shaped per its declared rank:
0 = scalar, 1 = [T], 2 = [T, K]); it returns a scalar loss and scalar metrics keyed
`custom/<name>:sum` or `custom/<name>:mean`. Losses are summed over datums; `:sum` metrics are
summed and `:mean` metrics averaged over datums.
"""

from __future__ import annotations

import math
import operator
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

MAX_NODES = 2000
MAX_INPUTS = 16  # logprobs included, as the SDK enforces
MAX_ELEMENTS = 1 << 24  # per tensor (or the datum's largest input, if bigger); 16x that alive per datum
CALL_ELEMENTS = 1 << 32  # produced by all datums of one call together
MAX_INT = 1 << 62
MAX_SEQUENCE = 1024  # items in a list/tuple/dict/str, encoded or computed
MAX_DEPTH = 16  # nesting of encoded arguments

_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")
_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64, "bool": torch.bool}
_CONSTANTS = {
    "dtype": DTYPES,
    "layout": {"strided": torch.strided},
    "memory_format": {"contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format},
    "float": {"inf": math.inf, "-inf": -math.inf, "nan": math.nan},
}


class CustomLossError(ValueError):
    """A graph or an evaluation the server refuses; the message is meant for the user."""


# ---- guarded callables -------------------------------------------------------------------------


def _arith(op: Callable[..., Any]) -> Callable[..., Any]:
    """A Python operator restricted to tensors and numbers (tuple + tuple for shape arithmetic),
    so that `[0] * 10**9` or `2 ** 10**9` cannot run."""

    def run(*xs: Any) -> Any:
        tuples = op is operator.add and all(isinstance(x, tuple) for x in xs)
        if not tuples and not all(isinstance(x, (torch.Tensor, int, float)) for x in xs):
            raise CustomLossError(
                f"operator.{op.__name__} takes tensors and numbers, got {[type(x).__name__ for x in xs]}"
            )
        if op is operator.pow and all(type(x) is int for x in xs) and abs(xs[0]) > 1 and abs(xs[1]) > 62:
            raise CustomLossError("integer power too large")
        return op(*xs)

    run.__name__ = op.__name__
    return run


def _getitem(obj: Any, index: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        for i in index if isinstance(index, tuple) else (index,):
            if isinstance(i, (list, tuple)) or (isinstance(i, torch.Tensor) and i.dtype != torch.bool):
                raise CustomLossError("indexing with integer tensors or lists is not allowed; use torch.gather")
    return obj[index]


def _getattr(obj: Any, name: str) -> Any:
    allowed = ATTRIBUTES.get("Tensor" if isinstance(obj, torch.Tensor) else type(obj).__module__, ())
    if name not in allowed:
        raise CustomLossError(f"reading {name!r} from a {type(obj).__name__} is not allowed")
    return getattr(obj, name)


def _gather(input: torch.Tensor, dim: int, index: torch.Tensor, *, sparse_grad: bool = False) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise CustomLossError("gather needs an int64 index tensor")
    if index.numel() and bool((index.min() < 0) | (index.max() >= input.size(dim))):
        raise CustomLossError(f"gather index out of range for dimension {dim} of size {input.size(dim)}")
    return torch.gather(input, dim, index)


def _to(
    self: torch.Tensor,
    *args: Any,
    dtype: Any = None,
    device: Any = None,
    non_blocking: bool = False,
    copy: bool = False,
    memory_format: Any = None,
) -> torch.Tensor:
    """`Tensor.to` for dtypes only: devices (objects or strings) are ignored, the tensor stays put."""
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            dtype = a.dtype
        elif not isinstance(a, (torch.device, str, bool)):
            raise CustomLossError(f"Tensor.to got a {type(a).__name__}")
    if dtype is not None and dtype not in DTYPES.values():
        raise CustomLossError(f"cannot cast to {dtype}; allowed: {', '.join(DTYPES)}")
    return self.to(dtype or self.dtype, copy=copy)


def _relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    if inplace:
        raise CustomLossError("in-place operations are not allowed")
    return torch.relu(input)


def _check_size(size: Sequence[Any]) -> None:
    dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
    numel = math.prod(int(d) for d in dims)
    if numel > MAX_ELEMENTS:
        raise CustomLossError(f"a tensor of {numel} elements is too large (at most {MAX_ELEMENTS})")


def _sized(
    make: Callable[..., torch.Tensor], n_size: int | None = None, method: bool = False
) -> Callable[..., torch.Tensor]:
    """A tensor factory whose size (size=, else the positional args after self, or the first n_size) is
    checked before anything is allocated."""

    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        _check_size(kwargs["size"] if "size" in kwargs else args[1 if method else 0 :][:n_size])
        return make(*args, **kwargs)

    return run


def _arange(start: Any, end: Any = None, step: Any = 1, **kwargs: Any) -> torch.Tensor:
    if end is None:
        start, end = 0, start
    _check_size([max(0, math.ceil((end - start) / step))])
    return torch.arange(start, end, step, **kwargs)


# ---- the allow-lists ---------------------------------------------------------------------------

_MATH = "exp log log1p expm1 sqrt rsqrt pow square abs neg sign reciprocal sigmoid tanh relu"
_PICK = "clamp clip clamp_min clamp_max minimum maximum where masked_fill nan_to_num isfinite isnan"
_REDUCE = "sum mean prod amax amin max min logsumexp softmax log_softmax cumsum any all"
_SHAPE = "reshape flatten squeeze unsqueeze transpose permute t detach"
_LOGIC = "add sub mul div eq ne lt le gt ge logical_and logical_or logical_not"
_TORCH = f"{_MATH} {_PICK} {_REDUCE} {_SHAPE} {_LOGIC} ones_like zeros_like full_like stack cat".split()
_TENSOR = f"{_MATH} {_PICK} {_REDUCE} {_SHAPE} {_LOGIC} view expand expand_as contiguous float double long bool type_as size dim numel".split()

FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"torch.{n}": getattr(torch, n) for n in _TORCH},
    "torch.gather": _gather,
    "torch.ones": _sized(torch.ones),
    "torch.zeros": _sized(torch.zeros),
    "torch.full": _sized(torch.full, 1),
    "torch.arange": _arange,
    "torch.nn.functional.softmax": F.softmax,
    "torch.nn.functional.log_softmax": F.log_softmax,
    "torch.nn.functional.relu": _relu,
    "torch._C._nn.log_sigmoid": F.logsigmoid,
    "torch._C._nn.softplus": F.softplus,
    **{
        f"operator.{n}": _arith(getattr(operator, n))
        for n in "add sub mul truediv floordiv mod pow neg pos abs".split()
    },
    **{f"operator.{n}": getattr(operator, n) for n in "eq ne lt le gt ge and_ or_ xor invert".split()},
    "operator.getitem": _getitem,
    **{f"math.{n}": getattr(math, n) for n in "sqrt log exp log1p expm1 floor ceil isfinite isnan".split()},
    "getattr": _getattr,
    "builtins.getattr": _getattr,
}
METHODS: dict[str, Callable[..., Any]] = {
    **{n: getattr(torch.Tensor, n) for n in _TENSOR},
    "to": _to,
    "gather": _gather,
    "new_zeros": _sized(torch.Tensor.new_zeros, method=True),
    "new_ones": _sized(torch.Tensor.new_ones, method=True),
    "new_full": _sized(torch.Tensor.new_full, 1, method=True),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "Tensor": ("shape", "ndim", "dtype", "device", "T", "mT"),
    "torch.return_types": ("values", "indices"),  # torch.max(x, dim=...) and friends
}
_CREATES = {"torch.ones", "torch.zeros", "torch.full", "torch.arange"}  # made on the datum's device
_CONCATENATES = {"torch.cat", "torch.stack"}


# ---- compiling ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    name: str


_DEVICE = object()  # stands for the evaluation device wherever a graph names one


@dataclass(frozen=True)
class _Step:
    name: str
    label: str  # "torch.exp", "Tensor.sum", ... for messages
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    method: bool
    frees: tuple[str, ...] = ()  # values no node after this one reads: dropped once it has run


def _decode(value: Any, known: set[str], where: str, depth: int = 0) -> Any:
    """An encoded argument as a template: Python values, with _Ref and _DEVICE still to resolve."""
    if depth > MAX_DEPTH:
        raise CustomLossError(f"{where}: arguments nested too deeply")
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise CustomLossError(f"{where}: integer {value} is too large")
        return value
    if isinstance(value, (str, list, dict)) and len(value) > MAX_SEQUENCE:
        raise CustomLossError(f"{where}: argument too long")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [_decode(v, known, where, depth + 1) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise CustomLossError(f"{where}: cannot decode argument {value!r}")
    ((kind, body),) = value.items()
    if kind == "ref":
        if not isinstance(body, str) or body not in known:
            raise CustomLossError(f"{where}: refers to {body!r}, which is not an earlier node")
        return _Ref(body)
    if kind == "tuple" and isinstance(body, list):
        return tuple(_decode(v, known, where, depth + 1) for v in body)
    if kind == "dict" and isinstance(body, dict) and len(body) <= MAX_SEQUENCE:
        return {str(k): _decode(v, known, where, depth + 1) for k, v in body.items()}
    if kind == "slice" and isinstance(body, list) and len(body) == 3:
        return slice(*(_decode(v, known, where, depth + 1) for v in body))
    if kind == "ellipsis" and body is True:
        return Ellipsis
    if kind == "device" and isinstance(body, str):
        return _DEVICE
    if kind in _CONSTANTS and isinstance(body, str) and body in _CONSTANTS[kind]:
        return _CONSTANTS[kind][body]
    if kind in _CONSTANTS:
        raise CustomLossError(f"{where}: {kind} {body!r} is not allowed; allowed: {', '.join(_CONSTANTS[kind])}")
    raise CustomLossError(f"{where}: cannot decode argument {value!r}")


def _resolve(t: Any, env: dict[str, Any], device: torch.device) -> Any:
    if isinstance(t, _Ref):
        return env[t.name]
    if t is _DEVICE:
        return device
    if isinstance(t, list):
        return [_resolve(v, env, device) for v in t]
    if isinstance(t, tuple):
        return tuple(_resolve(v, env, device) for v in t)
    if isinstance(t, dict):
        return {k: _resolve(v, env, device) for k, v in t.items()}
    if isinstance(t, slice):
        return slice(_resolve(t.start, env, device), _resolve(t.stop, env, device), _resolve(t.step, env, device))
    return t


def _check_inputs(inputs: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= MAX_INPUTS:
        raise CustomLossError(f"inputs must list 1 to {MAX_INPUTS} inputs, logprobs first")
    out: list[tuple[str, int]] = []
    for x in inputs:
        name, rank = (x.get("name"), x.get("rank")) if isinstance(x, dict) else (None, None)
        if (
            not (isinstance(name, str) and _INPUT_NAME.fullmatch(name))
            or rank not in (0, 1, 2)
            or type(rank) is not int
        ):
            raise CustomLossError(f"input {x!r} must be {{'name': <lowercase name>, 'rank': 0|1|2}}")
        if name in (n for n, _ in out):
            raise CustomLossError(f"input {name!r} is listed twice")
        out.append((name, rank))
    if out[0][0] != "logprobs" or out[0][1] == 0:
        raise CustomLossError("the first input must be logprobs, with rank 1 ([T]) or 2 ([T, K])")
    return tuple(out)


def compile_graph(graph: Any, inputs: Any, name: str = "custom_loss") -> CustomLoss:
    """Validate an uploaded graph completely and turn it into a CustomLoss; CustomLossError if not."""
    declared = _check_inputs(inputs)
    if not isinstance(graph, dict) or graph.get("format") != 1:
        raise CustomLossError("graph must be {'format': 1, 'nodes': [...]}: only format 1 is supported")
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise CustomLossError("graph has no nodes")
    if len(nodes) > MAX_NODES:
        raise CustomLossError(f"graph has {len(nodes)} nodes; at most {MAX_NODES} are allowed")

    placeholders: list[tuple[str, str]] = []  # (node name, input name)
    steps: list[_Step] = []
    known: set[str] = set()
    output: Any = None
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise CustomLossError(f"node {i} is not an object")
        op, nname, target = node.get("op"), node.get("name"), node.get("target")
        args, kwargs = node.get("args", []), node.get("kwargs", {})
        if not (isinstance(nname, str) and _NODE_NAME.fullmatch(nname)):
            raise CustomLossError(f"node {i} has an invalid name {nname!r}")
        where = f"node {nname!r}"
        if nname in known:
            raise CustomLossError(f"{where} appears twice")
        if op not in _OPS:
            raise CustomLossError(f"{where} has unknown op {op!r}; expected one of {', '.join(_OPS)}")
        if not (isinstance(target, str) and isinstance(args, list) and isinstance(kwargs, dict)) or len(args) > 64:
            raise CustomLossError(f"{where} needs a string target, a list of args and an object of kwargs")
        if output is not None:
            raise CustomLossError(f"{where} follows the output node")
        if op == "placeholder":
            if steps or args or kwargs:
                raise CustomLossError(f"{where}: placeholders come first and take no arguments")
            placeholders.append((nname, target))
        elif op == "get_attr":
            raise CustomLossError(f"{where} reads {target!r} from the module; a loss may only use its inputs")
        elif op == "call_module":
            raise CustomLossError(f"{where} calls module {target!r}, which is not allowed; use functions only")
        elif op == "output":
            if len(args) != 1 or kwargs:
                raise CustomLossError(f"{where}: the output node takes one argument")
            output = _decode(args[0], known, where)
        else:
            method = op == "call_method"
            fn = (METHODS if method else FUNCTIONS).get(target)
            if fn is None:
                if method:
                    raise CustomLossError(
                        f"{where} calls method Tensor.{target}, which is not allowed; "
                        f"allowed methods: {', '.join(sorted(METHODS))}"
                    )
                raise CustomLossError(
                    f"{where} calls {target}, which is not allowed; allowed: {', '.join(sorted(FUNCTIONS))}"
                )
            if method and not (args and isinstance(args[0], dict) and "ref" in args[0]):
                raise CustomLossError(f"{where}: a method call's first argument must be a node")
            if fn is _getattr and not (
                len(args) == 2
                and not kwargs
                and isinstance(args[1], str)
                and any(args[1] in a for a in ATTRIBUTES.values())
            ):
                raise CustomLossError(
                    f"{where} reads attribute {args[1:]!r}, which is not allowed; "
                    f"allowed: {', '.join(a for v in ATTRIBUTES.values() for a in v)}"
                )
            if "out" in kwargs or kwargs.get("inplace", False) is not False:
                raise CustomLossError(f"{where}: out= and inplace=True are not allowed")
            dargs = tuple(_decode(a, known, where) for a in args)
            dkwargs = {str(k): _decode(v, known, where) for k, v in kwargs.items()}
            if target in _CREATES or "device" in dkwargs:
                dkwargs["device"] = _DEVICE
            steps.append(_Step(nname, f"Tensor.{target}" if method else target, fn, dargs, dkwargs, method))
        known.add(nname)

    if [target for _, target in placeholders] != [n for n, _ in declared]:
        raise CustomLossError(
            f"graph takes {[t for _, t in placeholders]}, but inputs declare {[n for n, _ in declared]}"
        )
    if not (
        isinstance(output, (tuple, list))
        and len(output) == 2
        and isinstance(output[0], _Ref)
        and isinstance(output[1], dict)
    ):
        raise CustomLossError("the graph must return (loss, {metric: value})")
    for key, value in output[1].items():
        if not _METRIC_KEY.fullmatch(key) or not isinstance(value, _Ref):
            raise CustomLossError(
                f"metric {key!r} must be named custom/<name>:sum or custom/<name>:mean "
                "in lowercase and be a computed value"
            )
    metrics = {k: v.name for k, v in output[1].items()}
    steps = _with_frees(steps, [n for n, _ in placeholders], {output[0].name, *metrics.values()})
    return CustomLoss(name, declared, tuple(n for n, _ in placeholders), tuple(steps), output[0].name, metrics)


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, _Ref):
        yield value.name
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, slice):
        yield from _refs((value.start, value.stop, value.step))


def _with_frees(steps: list[_Step], placeholders: list[str], kept: set[str]) -> list[_Step]:
    """Each step with the values whose last reader it is (never the loss or a metric)."""
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for name in _refs((step.args, step.kwargs)):
            last[name] = i
    frees: dict[int, list[str]] = {}
    for name in [*placeholders, *(s.name for s in steps)]:
        if name not in kept and name in last:
            frees.setdefault(last[name], []).append(name)
    return [replace(step, frees=tuple(frees.get(i, ()))) for i, step in enumerate(steps)]


# ---- evaluating --------------------------------------------------------------------------------


def _tensors(values: Any) -> list[torch.Tensor]:
    if isinstance(values, torch.Tensor):
        return [values]
    if isinstance(values, (list, tuple)):
        return [t for v in values for t in _tensors(v)]
    if isinstance(values, dict):
        return _tensors(list(values.values()))
    return []


def _conform(name: str, t: torch.Tensor, rank: int, device: torch.device) -> torch.Tensor:
    """A datum's tensor at its declared rank (the protobuf wire cannot tell shape [] from none)."""
    t = torch.as_tensor(t).to(device)
    if rank == 0 and t.numel() == 1:
        return t.reshape(())
    if rank == 1 and t.ndim <= 1:
        return t.reshape(-1)
    if t.ndim != rank:
        raise CustomLossError(f"{name} has shape {tuple(t.shape)}, but the loss declared it with rank {rank}")
    return t


@dataclass
class EvalBudget:
    """What all datums of one call may spend together: elements produced, and a deadline."""

    elements: int = CALL_ELEMENTS
    deadline: float = math.inf  # time.monotonic()
    seconds: float = math.inf  # the limit, for messages
    spent: int = field(default=0)

    @classmethod
    def per_call(cls, seconds: float, elements: int = CALL_ELEMENTS) -> EvalBudget:
        return cls(elements=elements, deadline=time.monotonic() + seconds, seconds=seconds)

    def charge(self, elements: int, where: str) -> None:
        self.spent += elements
        if self.spent > self.elements:
            raise CustomLossError(
                f"{where}: the loss made more than {self.elements} tensor elements in this call (the per-call limit)"
            )
        if time.monotonic() > self.deadline:
            raise CustomLossError(f"{where}: the loss ran longer than this server's limit of {self.seconds:g} s per call")


@dataclass(frozen=True)
class CustomLoss:
    name: str
    inputs: tuple[tuple[str, int], ...]  # (name, rank), logprobs first
    _placeholders: tuple[str, ...]
    _steps: tuple[_Step, ...]
    _loss: str
    _metrics: dict[str, str]

    @property
    def input_names(self) -> tuple[str, ...]:
        """The loss_fn_inputs keys the loss reads, in order (logprobs excluded)."""
        return tuple(n for n, _ in self.inputs[1:])

    def evaluate(
        self, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], budget: EvalBudget | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the graph on one datum: the scalar loss (differentiable in lp) and its metrics as
        detached 0-d tensors. `budget`: the call's, shared by its datums (default: one datum's own)."""
        budget = budget if budget is not None else EvalBudget()
        device = lp.device
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise CustomLossError(f"loss {self.name!r} needs loss_fn_inputs {missing}")
        values = [_conform("logprobs", lp, self.inputs[0][1], device)]
        values += [_conform(f"loss_fn_inputs[{n!r}]", inputs[n], r, device) for n, r in self.inputs[1:]]
        cap = max(MAX_ELEMENTS, *(v.numel() for v in values))
        env: dict[str, Any] = dict(zip(self._placeholders, values))
        live = sum(v.numel() for v in values)
        for step in self._steps:
            where = f"loss {self.name!r}: node {step.name!r} ({step.label})"
            args = [_resolve(a, env, device) for a in step.args]
            kwargs = {k: _resolve(v, env, device) for k, v in step.kwargs.items()}
            if step.method and not isinstance(args[0], torch.Tensor):
                raise CustomLossError(f"{where} is called on a {type(args[0]).__name__}, not a tensor")
            # Only concatenation and broadcasting make more than their largest input: check those first.
            shapes, bound = [t.shape for t in _tensors([args, kwargs])], 0
            if step.label in _CONCATENATES:
                bound = sum(math.prod(s) for s in shapes)
            elif len(shapes) > 1:
                try:
                    bound = math.prod(torch.broadcast_shapes(*shapes))
                except RuntimeError:
                    pass  # not a broadcasting op (gather, masking, ...): the post-check suffices
            if bound > cap:
                raise CustomLossError(f"{where} would make a tensor of about {bound} elements (at most {cap})")
            try:
                out = step.fn(*args, **kwargs)
            except CustomLossError as e:
                raise CustomLossError(f"{where}: {e}") from None
            except Exception as e:  # torch's own errors: shapes, dtypes, ...
                raise CustomLossError(f"{where} failed: {type(e).__name__}: {e}") from None
            if isinstance(out, torch.Tensor):
                if out.numel() > cap:
                    raise CustomLossError(f"{where} makes too large a tensor ({out.numel()} elements, at most {cap})")
                live += out.numel()
                if live > 16 * cap:
                    raise CustomLossError(f"{where}: the loss holds more than {16 * cap} tensor elements at once")
                budget.charge(out.numel(), where)
            elif isinstance(out, int) and abs(out) > MAX_INT:
                raise CustomLossError(f"{where} makes too large an integer")
            elif isinstance(out, (tuple, list, dict, str)) and len(out) > MAX_SEQUENCE:
                raise CustomLossError(f"{where} makes too long a sequence")
            env[step.name] = out
            for name in step.frees:
                gone = env.pop(name)
                live -= gone.numel() if isinstance(gone, torch.Tensor) else 0

        loss = env[self._loss]
        if not (isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.is_floating_point()):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise CustomLossError(f"loss {self.name!r} must return a scalar floating-point loss, got {shape}")
        metrics = {}
        for key, ref in self._metrics.items():
            value = env[ref]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                metrics[key] = value.detach().reshape(()).to(torch.float64)
            elif isinstance(value, (int, float)):
                metrics[key] = torch.tensor(float(value), dtype=torch.float64, device=device)
            else:
                raise CustomLossError(f"loss {self.name!r} metric {key!r} must be a scalar")
        return loss, metrics

    def per_datum(self, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """One datum's scalar loss and its metrics as floats."""
        loss, metrics = self.evaluate(lp, inputs)
        return loss, {k: float(v) for k, v in metrics.items()}

    def batch(
        self, lps: Sequence[torch.Tensor], inputs: Sequence[Mapping[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The SDK's reduction (`run_loss_handle`): losses summed over datums, `:sum` metrics
        summed, `:mean` metrics averaged over datums."""
        if len(lps) != len(inputs) or not lps:
            raise CustomLossError("batch needs one inputs mapping per logprobs tensor, and at least one")
        total: Any = None
        sums: dict[str, torch.Tensor] = {}
        budget = EvalBudget()
        for lp, x in zip(lps, inputs):
            loss, metrics = self.evaluate(lp, x, budget)
            total = loss if total is None else total + loss
            for k, v in metrics.items():
                sums[k] = sums[k] + v if k in sums else v
        return total, {k: float(v) / (len(lps) if k.endswith(":mean") else 1) for k, v in sums.items()}
