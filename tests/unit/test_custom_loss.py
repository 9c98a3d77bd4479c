"""workers/custom_loss.py against the SDK's own tracing: each loss below is traced and encoded with
tinker's code (exactly what `create_custom_loss` uploads), sent through JSON, compiled here, and
must give the same loss, gradient w.r.t. logprobs and metrics as calling the Python function.
Then the refusals: forbidden operations, malformed graphs, oversized graphs and runtime blow-ups.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tinker import types
from tinker.lib.public_interfaces.custom_loss import encode_graph, run_loss_handle, trace_loss

from workers.custom_loss import MAX_NODES, CustomLossError, EvalBudget, compile_graph

torch.set_num_threads(1)


def wire(fn, ranks):
    """(graph, inputs) exactly as the JSON body of /api/v1/create_custom_loss carries them."""
    handle = trace_loss(fn, ranks, "sess")
    body = {"graph": encode_graph(handle).model_dump(mode="json"), "inputs": [i.model_dump() for i in handle.inputs]}
    body = json.loads(json.dumps(body, allow_nan=False))
    return body["graph"], body["inputs"]


def compiled(fn, ranks):
    graph, inputs = wire(fn, ranks)
    return compile_graph(graph, inputs, name=fn.__name__)


# ---- losses a user might write ------------------------------------------------------------------


def neg_ll(logprobs, weights):
    loss = -(logprobs * weights).sum()
    return loss, {"custom/neg_ll:sum": loss}


def ppo(logprobs, old_logprobs, advantages):
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    obj = torch.minimum(ratio * advantages, clipped * advantages)
    clipfrac = ((ratio < 0.8) | (ratio > 1.2)).float().mean()
    return -obj.sum(), {"custom/clipfrac:mean": clipfrac, "custom/tokens:sum": logprobs.new_ones(()) * logprobs.numel()}


def topk(logprobs, weights):  # logprobs [T, K]
    first = logprobs[..., 0] + logprobs[:, 1:].logsumexp(dim=-1)
    y = (first * weights).sum(dim=0, keepdim=True).squeeze(0)
    p = F.softmax(logprobs, dim=-1) * F.log_softmax(logprobs, -1)
    return -y + p.sum() * 1e-2 + logprobs.t().mean() + logprobs.mT.amax() + logprobs.T.amin(), {}


def guarded(logprobs, scale):  # scale is rank 0
    x = logprobs.clamp(min=-math.inf, max=0.0)
    z = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    n = logprobs.shape[0]
    w = torch.ones(n, dtype=torch.float32)
    discount = 0.9 ** torch.arange(logprobs.size(0), dtype=torch.float32)
    masked = z.masked_fill(z < -3, 0.0)
    return -(masked * scale * w * discount).sum() / math.sqrt(n), {"custom/scale:mean": scale * 1.0}


def picks(logprobs, index, mask):  # logprobs [T, K], index int64 [T], mask [T]
    picked = torch.gather(logprobs, 1, index.unsqueeze(-1)).squeeze(-1)
    kept = picked[mask > 0]
    best = torch.max(logprobs, dim=1).values
    both = torch.stack([picked, best]).sum(0) + torch.cat([picked, best]).reshape(2, -1)[0]
    lp64 = logprobs.detach().to(torch.float64).float() + logprobs.double().float()
    flat = logprobs.reshape(logprobs.shape[:-1] + (-1,)).flatten().view(-1)
    return -kept.sum() - both.mean() + 1e-3 * (lp64.sum() + flat.sum()), {"custom/kept:sum": kept.numel() * 1.0}


def smooth(logprobs, weights):
    a = torch.sigmoid(logprobs) + torch.tanh(logprobs) + F.relu(logprobs + 0.5) + F.logsigmoid(logprobs)
    b = F.softplus(logprobs) + torch.log1p(-logprobs.exp().clamp(max=0.99)) + torch.expm1(logprobs)
    c = torch.square(logprobs) + torch.rsqrt(weights.abs() + 1) + logprobs.pow(2) + logprobs**2 + 2**logprobs
    d = torch.maximum(logprobs, weights) + torch.clip(logprobs, -5, 0) + abs(logprobs) + (-logprobs).sqrt().nan_to_num()
    e = logprobs.unsqueeze(0).transpose(0, 1).permute(1, 0)[0] + logprobs[None, :].squeeze()
    f = torch.full_like(logprobs, 0.5) * (~(logprobs > -1)).float() + (logprobs != 0).long()
    total = (a + b + c + d + e + f).sum() / logprobs.numel() + torch.prod(logprobs[:2]) + logprobs.cumsum(0)[-1]
    return total, {"custom/total:mean": total.detach(), "custom/one:sum": torch.ones_like(total)}


T, K = 7, 4
gen = torch.Generator().manual_seed(0)


def lp_(shape):
    return (-torch.rand(shape, generator=gen, dtype=torch.float32) * 3 - 0.05).requires_grad_(True)


CASES = [
    (neg_ll, {"logprobs": 1, "weights": 1}, lambda: (lp_(T), {"weights": torch.randn(T, generator=gen)})),
    (
        ppo,
        {"logprobs": 1, "old_logprobs": 1, "advantages": 1},
        lambda: (
            lp_(T),
            {"old_logprobs": -torch.rand(T, generator=gen) * 3, "advantages": torch.randn(T, generator=gen)},
        ),
    ),
    (topk, {"logprobs": 2, "weights": 1}, lambda: (lp_((T, K)), {"weights": torch.randn(T, generator=gen)})),
    (guarded, {"logprobs": 1, "scale": 0}, lambda: (lp_(T), {"scale": torch.tensor(1.5)})),
    (
        picks,
        {"logprobs": 2, "index": 1, "mask": 1},
        lambda: (
            lp_((T, K)),
            {"index": torch.randint(0, K, (T,), generator=gen), "mask": (torch.rand(T, generator=gen) > 0.4).float()},
        ),
    ),
    (smooth, {"logprobs": 1, "weights": 1}, lambda: (lp_(T), {"weights": torch.randn(T, generator=gen)})),
]


@pytest.mark.parametrize("fn, ranks, make", CASES, ids=[c[0].__name__ for c in CASES])
def test_matches_direct_call(fn, ranks, make):
    loss_fn = compiled(fn, ranks)
    lp, inputs = make()
    names = [n for n in ranks if n != "logprobs"]
    assert loss_fn.input_names == tuple(names)

    want, want_metrics = fn(lp, *[inputs[n] for n in names])
    (want_grad,) = torch.autograd.grad(want, lp)
    got, got_metrics = loss_fn.per_datum(lp, inputs)
    (got_grad,) = torch.autograd.grad(got, lp)

    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-6, rtol=1e-6)
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(float(torch.as_tensor(value).detach()), rel=1e-6, abs=1e-6)


def test_batch_matches_sdk_reduction():
    """Losses summed, :sum metrics summed, :mean metrics averaged: as the SDK's run_loss_handle."""
    ranks = {"logprobs": 1, "old_logprobs": 1, "advantages": 1}
    loss_fn = compiled(ppo, ranks)
    handle = trace_loss(ppo, ranks, "sess")
    lengths = [3, 5, 2]
    lps = [lp_(n) for n in lengths]
    inputs = [
        {"old_logprobs": lp.detach() + 0.3 * torch.randn(n, generator=gen), "advantages": torch.randn(n, generator=gen)}
        for lp, n in zip(lps, lengths)
    ]
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(list(range(n))),
            loss_fn_inputs={
                "target_tokens": list(range(n)),
                **{k: types.TensorData.from_torch(v) for k, v in x.items()},
            },
        )
        for n, x in zip(lengths, inputs)
    ]
    want, want_metrics = run_loss_handle(handle, data, lps)
    got, got_metrics = loss_fn.batch(lps, inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert got_metrics == pytest.approx(want_metrics, rel=1e-6)
    assert got_metrics["custom/tokens:sum"] == sum(lengths)


def test_inputs_conform_to_declared_rank():
    """The protobuf wire cannot tell shape [] from no shape: ranks come from the declaration."""
    loss_fn = compiled(guarded, {"logprobs": 1, "scale": 0})
    lp = lp_(T)
    a, _ = loss_fn.per_datum(lp, {"scale": torch.tensor([2.0])})  # a 1-element [1] -> scalar
    b, _ = loss_fn.per_datum(lp, {"scale": torch.tensor(2.0)})
    torch.testing.assert_close(a, b)
    with pytest.raises(CustomLossError, match="rank 0"):
        loss_fn.per_datum(lp, {"scale": torch.ones(2)})
    with pytest.raises(CustomLossError, match="scale"):
        loss_fn.per_datum(lp, {})
    with pytest.raises(CustomLossError, match="logprobs has shape"):
        compiled(neg_ll, {"logprobs": 1, "weights": 1}).per_datum(lp_((T, K)), {"weights": torch.ones(T)})


# ---- refusals -----------------------------------------------------------------------------------


def base():
    return wire(neg_ll, {"logprobs": 1, "weights": 1})


def with_node(node, at=-1):
    graph, inputs = base()
    graph["nodes"].insert(at if at >= 0 else len(graph["nodes"]) - 1, node)
    return graph, inputs


def call(target, *args, op="call_function", name="x_3", **kwargs):
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


LP = {"ref": "logprobs"}


@pytest.mark.parametrize(
    "node, message",
    [
        (call("builtins.eval", "__import__('os')"), "node 'x_3' calls builtins.eval, which is not allowed; allowed: "),
        (call("eval", "1"), "calls eval, which is not allowed"),
        (call("torch.save", LP, "/tmp/x"), "calls torch.save, which is not allowed"),
        (call("os.system", "rm -rf /"), "calls os.system, which is not allowed"),
        (call("torch.load", "/etc/passwd"), "calls torch.load"),
        (call("builtins.__import__", "os"), "calls builtins.__import__"),
        (call("getattr", LP, "__class__"), "reads attribute ['__class__']"),
        (call("getattr", LP, "grad"), "reads attribute ['grad']"),
        (call("getattr", LP, {"ref": "weights"}), "reads attribute"),
        (call("setattr", LP, "data", 1), "calls setattr"),
        (call("backward", LP, op="call_method"), "calls method Tensor.backward, which is not allowed"),
        (call("item", LP, op="call_method"), "Tensor.item"),
        (call("add_", LP, 1, op="call_method"), "Tensor.add_"),
        (call("__setitem__", LP, 0, 1.0, op="call_method"), "Tensor.__setitem__"),
        (call("sum", 1, op="call_method"), "first argument must be a node"),
        (call("fc", LP, op="call_module"), "calls module 'fc', which is not allowed"),
        (call("_tensor_constant0", op="get_attr"), "reads '_tensor_constant0'"),
        (call("torch.exp", LP, out=LP), "out= and inplace=True"),
        (call("torch.nn.functional.relu", LP, inplace=True), "out= and inplace=True"),
        (call("torch.ones", 3, dtype={"dtype": "complex64"}), "dtype 'complex64' is not allowed"),
        (call("torch.exp", {"lambda": "x"}), "cannot decode"),
        (call("torch.exp", {"ref": "logprobs", "x": 1}), "cannot decode"),
        (call("torch.exp", {"float": "1e999"}), "float '1e999' is not allowed"),
        (call("torch.exp", 10**30), "too large"),
    ],
)
def test_forbidden_nodes_are_refused(node, message):
    graph, inputs = with_node(node)
    with pytest.raises(CustomLossError) as e:
        compile_graph(graph, inputs)
    assert message in str(e.value)


def mutate(change):
    graph, inputs = base()
    change(graph, inputs)
    return graph, inputs


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda g, i: g.update(format=2), "only format 1"),
        (lambda g, i: g.pop("format"), "only format 1"),
        (lambda g, i: g.update(nodes=[]), "no nodes"),
        (
            lambda g, i: g["nodes"][2]["args"].__setitem__(0, {"ref": "nope"}),
            "refers to 'nope', which is not an earlier",
        ),
        (lambda g, i: g["nodes"][2]["args"].__setitem__(0, {"ref": "sum_1"}), "refers to 'sum_1'"),  # forward ref
        (lambda g, i: g["nodes"][2]["args"].__setitem__(0, {"ref": "mul"}), "refers to 'mul'"),  # self ref: a cycle
        (lambda g, i: g["nodes"][3].update(name="mul"), "node 'mul' appears twice"),
        (lambda g, i: g["nodes"][3].update(name="a b"), "invalid name"),
        (lambda g, i: g["nodes"][2].update(op="call_eval"), "unknown op 'call_eval'"),
        (lambda g, i: g["nodes"][2].update(target=None), "string target"),
        (lambda g, i: g["nodes"][2].update(args="x"), "list of args"),
        (lambda g, i: g["nodes"].pop(), "must return (loss"),
        (lambda g, i: g["nodes"].append(dict(g["nodes"][-1], name="out2")), "follows the output node"),
        (lambda g, i: g["nodes"].insert(3, dict(g["nodes"][0], name="late", target="late")), "placeholders come first"),
        (lambda g, i: i.pop(), "graph takes ['logprobs', 'weights'], but inputs declare ['logprobs']"),
        (lambda g, i: i.reverse(), "first input must be logprobs"),
        (lambda g, i: i[0].update(rank=0), "rank 1 ([T]) or 2"),
        (lambda g, i: i[1].update(rank=3), "'rank': 0|1|2"),
        (lambda g, i: i[1].update(name="Weights!"), "lowercase name"),
        (lambda g, i: i.append(dict(i[1])), "listed twice"),
        (lambda g, i: g["nodes"][-1].update(args=[{"ref": "neg"}]), "must return (loss"),
        (lambda g, i: g["nodes"][-1]["args"][0]["tuple"][1]["dict"].update({"loss:sum": {"ref": "neg"}}), "'loss:sum'"),
        (lambda g, i: g["nodes"][-1]["args"][0]["tuple"][1]["dict"].update({"custom/x:sum": 1.0}), "'custom/x:sum'"),
    ],
)
def test_malformed_graphs_are_refused(change, message):
    graph, inputs = mutate(change)
    with pytest.raises(CustomLossError) as e:
        compile_graph(graph, inputs)
    assert message in str(e.value)


def chain(n, target="operator.mul", arg=1.0):
    """A legal graph of n nodes: logprobs, n - 3 chained ops, sum, output."""
    nodes = [{"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}}]
    prev = "logprobs"
    for k in range(n - 3):
        nodes.append(call(target, {"ref": prev}, arg, name=f"n{k}"))
        prev = f"n{k}"
    nodes.append(call("sum", {"ref": prev}, op="call_method", name="total"))
    nodes.append(
        {
            "op": "output",
            "name": "output",
            "target": "output",
            "args": [{"tuple": [{"ref": "total"}, {"dict": {}}]}],
            "kwargs": {},
        }
    )
    return {"format": 1, "nodes": nodes}, [{"name": "logprobs", "rank": 1}]


def test_graph_size_is_bounded():
    graph, inputs = chain(MAX_NODES)
    loss, _ = compile_graph(graph, inputs).per_datum(torch.ones(3), {})
    assert float(loss) == 3.0
    with pytest.raises(CustomLossError, match=f"{MAX_NODES + 1} nodes; at most {MAX_NODES}"):
        compile_graph(*chain(MAX_NODES + 1))
    deep = 1.0
    for _ in range(40):
        deep = {"tuple": [deep]}
    with pytest.raises(CustomLossError, match="nested too deeply"):
        compile_graph(*with_node(call("torch.exp", deep)))


def test_compile_errors_are_value_errors():
    assert issubclass(CustomLossError, ValueError)


# ---- runtime guards -----------------------------------------------------------------------------


def run_nodes(*nodes, lp=None, weights=None):
    """Compile neg_ll with extra nodes before its output, and run it."""
    graph, inputs = base()
    graph["nodes"][-1:-1] = list(nodes)
    lp = torch.full((T,), -1.0) if lp is None else lp
    return compile_graph(graph, inputs).per_datum(lp, {"weights": torch.ones(T) if weights is None else weights})


@pytest.mark.parametrize(
    "nodes, message",
    [
        ([call("torch.ones", 10**9)], "too large"),
        ([call("torch.zeros", {"tuple": [100000, 100000]})], "too large"),
        ([call("torch.arange", 0, 10**12)], "too large"),
        ([call("new_full", LP, {"tuple": [10**5, 10**5]}, 1.0, op="call_method")], "too large"),
        ([call("expand", LP, 10**7, T, op="call_method")], "too large a tensor"),
        (
            [
                call("reshape", LP, -1, 1, op="call_method", name="c"),
                call("expand", {"ref": "c"}, T, 4000, op="call_method", name="e"),  # a view: no memory yet
                call("reshape", {"ref": "e"}, -1, 1, op="call_method", name="col"),  # [28000, 1]
                call("reshape", {"ref": "e"}, 1, -1, op="call_method", name="row"),  # [1, 28000]
                call("operator.mul", {"ref": "col"}, {"ref": "row"}),  # would be 784M elements
            ],
            "would make a tensor",
        ),
        (
            [
                call("expand", LP, 100_000, T, op="call_method", name="e"),  # 700k elements, a view
                call("torch.cat", [{"ref": "e"}] * 30),  # 21M elements
            ],
            "would make a tensor of about 21000000 elements",
        ),
        ([call("operator.getitem", LP, {"ref": "weights"})], "integer tensors"),  # float index: refused anyway
        (
            [
                call("long", {"ref": "weights"}, op="call_method", name="idx"),
                call("operator.getitem", LP, {"ref": "idx"}),
            ],
            "integer tensors",
        ),
        ([call("operator.getitem", LP, [0, 1])], "integer tensors or lists"),
        (
            [
                call("long", {"ref": "weights"}, op="call_method", name="idx"),
                call("operator.mul", {"ref": "idx"}, 99, name="far"),
                call("torch.gather", LP, 0, {"ref": "far"}),
            ],
            "gather index out of range",
        ),
        ([call("operator.mul", {"tuple": [0]}, 10**9)], "takes tensors and numbers"),
        ([call("operator.mul", "a", 10**9)], "takes tensors and numbers"),
        ([call("operator.pow", 10, 10**9)], "integer power too large"),
        ([call("operator.mul", 2**61, 2**61)], "too large an integer"),
        ([call("getattr", 1, "shape")], "reading 'shape' from a int is not allowed"),
        ([call("sum", {"ref": "x_0"}, op="call_method", name="x_1")], "refers to 'x_0'"),
        (
            [call("to", LP, {"dtype": "float32"}, op="call_method"), call("torch.exp", "a", name="x_4")],
            "failed: TypeError",
        ),
    ],
)
def test_runtime_guards(nodes, message):
    with pytest.raises(CustomLossError) as e:
        run_nodes(*nodes)
    assert message in str(e.value)


def test_loss_must_be_a_float_scalar():
    graph, inputs = base()
    out = copy.deepcopy(graph)
    out["nodes"][-1]["args"][0]["tuple"][0] = {"ref": "mul"}  # a [T] tensor
    with pytest.raises(CustomLossError, match=r"scalar floating-point loss, got \(7,\)"):
        compile_graph(out, inputs).per_datum(torch.zeros(T), {"weights": torch.ones(T)})


def test_graph_devices_are_ignored():
    """A device named in the graph (cpu, cuda:7, ...) never moves a tensor: all stay with logprobs."""

    def dev(logprobs):
        x = logprobs.to(device="cpu", dtype=torch.float64) + torch.zeros_like(logprobs, device="cpu")
        y = torch.ones(logprobs.shape[0], device=logprobs.device) + x.to(logprobs)
        return y.sum().float(), {}

    graph, inputs = wire(dev, {"logprobs": 1})
    for node in graph["nodes"]:
        if node["target"] == "zeros_like":
            node["kwargs"]["device"] = {"device": "cuda:7"}
    lp = lp_(T)
    got, _ = compile_graph(graph, inputs).per_datum(lp, {})
    torch.testing.assert_close(got, dev(lp)[0])


def fan(n):
    """A legal graph whose n products of logprobs are all alive until a chain of adds uses them."""
    nodes = [{"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}}]
    nodes += [call("operator.mul", {"ref": "logprobs"}, 1.0, name=f"a{k}") for k in range(n)]
    prev = "a0"
    for k in range(1, n):
        nodes.append(call("operator.add", {"ref": prev}, {"ref": f"a{k}"}, name=f"s{k}"))
        prev = f"s{k}"
    nodes.append(call("sum", {"ref": prev}, op="call_method", name="total"))
    out = {"tuple": [{"ref": "total"}, {"dict": {}}]}
    nodes.append({"op": "output", "name": "output", "target": "output", "args": [out], "kwargs": {}})
    return {"format": 1, "nodes": nodes}, [{"name": "logprobs", "rank": 1}]


def test_live_elements_are_bounded_and_dead_values_freed(monkeypatch):
    monkeypatch.setattr("workers.custom_loss.MAX_ELEMENTS", 100)  # cap 100 per tensor, 1600 alive at once
    loss, _ = compile_graph(*chain(2000)).per_datum(torch.ones(T), {})  # 1997 x 7 made, few alive at once
    assert float(loss) == T
    compile_graph(*fan(200)).per_datum(torch.ones(T), {})  # 200 x 7 alive before the adds free them
    with pytest.raises(CustomLossError, match="holds more than 1600 tensor elements at once"):
        compile_graph(*fan(300)).per_datum(torch.ones(T), {})


def test_a_call_has_one_budget_of_elements_and_time():
    loss_fn = compile_graph(*chain(10))
    budget = EvalBudget(elements=80)
    loss_fn.evaluate(torch.ones(T), {}, budget)  # 7 x 7 elements and a sum: 50
    with pytest.raises(CustomLossError, match="more than 80 tensor elements in this call"):
        loss_fn.evaluate(torch.ones(T), {}, budget)  # the same call's next datum
    late = EvalBudget.per_call(seconds=0.0)
    with pytest.raises(CustomLossError, match="longer than this server's limit of 0 s per call"):
        loss_fn.evaluate(torch.ones(T), {}, late)


def test_total_elements_are_bounded(monkeypatch):
    monkeypatch.setattr("workers.custom_loss.MAX_ELEMENTS", 100)
    loss, _ = compile_graph(*chain(5)).per_datum(torch.ones(150), {})  # the largest input raises the cap
    assert float(loss) == 150.0
    with pytest.raises(CustomLossError, match=r"too large \(at most 100\)"):
        compile_graph(*with_node(call("torch.ones", 101))).per_datum(torch.ones(T), {"weights": torch.ones(T)})
