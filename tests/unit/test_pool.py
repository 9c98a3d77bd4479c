"""The LoRA pool of LoraTrainer (workers/trainer.py): with max_resident, idle tenant adapters are
paged out (weights, pending gradients, AdamW state) to host memory, and past a host budget to disk,
and paged back in bit-exactly.

The reference for every paged run is the same run on a trainer without a limit, which never pages:
both must compute bit-identical losses, gradients and weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from schemas.wire import DatumIn
from tests.support.lora import perturb_b
from workers import adapter_files as files
from workers.lora_pool import LOCK_FILE
from workers.losses import get_loss
from workers.trainer import AdapterError, LoraTrainer, load_base_model
from workers.types import AdamConfig, BaseModelInfo, LoraSpec, PoolStatus

VOCAB = 4096
INFO = BaseModelInfo(
    name="tiny-qwen3", architecture="Qwen3ForCausalLM", vocab_size=VOCAB, max_context_length=4096, eos_token_ids=(2,)
)
CE = get_loss("cross_entropy")
IS = get_loss("importance_sampling")
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")


# ----- helpers ----------------------------------------------------------------------------------
@pytest.fixture
def new_trainer(tiny_model_dir: Path) -> Callable[..., LoraTrainer]:
    """A fresh trainer (own copy of the base model) with the given pool settings."""

    def new(**pool) -> LoraTrainer:
        return LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0, **pool)

    return new


def state_of(trainer: LoraTrainer, name: str) -> dict[str, torch.Tensor | None]:
    """Weights, pending gradients and AdamW state of an adapter (paging it in), as copies."""
    adapter = trainer._adapter(name)
    out: dict[str, torch.Tensor | None] = {}
    for key, p in adapter.params.items():
        out[f"w/{key}"] = p.detach().clone()
        out[f"g/{key}"] = None if p.grad is None else p.grad.clone()
        if adapter.optimizer is not None and p in adapter.optimizer.state:
            for slot, value in adapter.optimizer.state[p].items():
                out[f"{slot}/{key}"] = torch.as_tensor(value).clone()
    out["has_optimizer"] = torch.tensor(adapter.optimizer is not None)
    return out


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def ce_data(rng: np.random.Generator, lengths) -> list[DatumIn]:
    return [
        DatumIn(
            tokens=rng.integers(3, VOCAB, n).astype(np.int64),
            loss_fn_inputs={
                "target_tokens": rng.integers(3, VOCAB, n).astype(np.int64),
                "weights": rng.uniform(0.0, 1.0, n).astype(np.float32),
            },
        )
        for n in lengths
    ]


def is_data(rng: np.random.Generator, lengths) -> list[DatumIn]:
    return [
        DatumIn(
            tokens=rng.integers(3, VOCAB, n).astype(np.int64),
            loss_fn_inputs={
                "target_tokens": rng.integers(3, VOCAB, n).astype(np.int64),
                "logprobs": rng.uniform(-9.0, -7.5, n).astype(np.float32),
                "advantages": rng.standard_normal(n).astype(np.float32),
            },
        )
        for n in lengths
    ]


def train_a_bit(trainer: LoraTrainer, name: str, seed: int, *, pending: bool = True) -> None:
    """Two optimizer steps, then (with `pending`) gradients of one more forward_backward."""
    rng = np.random.default_rng(seed)
    adam = AdamConfig(learning_rate=1e-2, weight_decay=0.01)
    for _ in range(2):
        trainer.forward_backward(name, ce_data(rng, (4, 6)), CE, {})
        trainer.optim_step(name, adam)
    if pending:
        trainer.forward_backward(name, ce_data(rng, (5,)), CE, {})


_names = itertools.count()


def fresh(trainer: LoraTrainer, rank: int = 4, *, perturb: bool = True) -> str:
    name = f"p{next(_names)}"
    trainer.create_adapter(name, LoraSpec(rank=rank, seed=rank))
    if perturb:
        perturb_b(trainer, name, rank)
    return name


def spill_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))  # each pool spills into a folder of its own


# ----- the must-show scenario: five tenants, two slots ---------------------------------------------
@dataclass(frozen=True)
class Tenant:
    name: str
    spec: LoraSpec
    loss_name: str
    adam: AdamConfig


TENANTS = (
    Tenant("r1", LoraSpec(rank=1, seed=1), "cross_entropy", AdamConfig(learning_rate=1e-2)),
    Tenant("r4", LoraSpec(rank=4, seed=2, alpha=8.0), "importance_sampling",
           AdamConfig(learning_rate=5e-3, beta1=0.8, weight_decay=0.01)),
    Tenant("r8", LoraSpec(rank=8, seed=3), "cross_entropy",
           AdamConfig(learning_rate=2e-2, beta2=0.99, grad_clip_norm=0.5)),
    Tenant("r16", LoraSpec(rank=16, seed=4, train_unembed=False), "importance_sampling",
           AdamConfig(learning_rate=1e-2, eps=1e-8, weight_decay=0.1)),
    Tenant("r32", LoraSpec(rank=32, seed=5, alpha=64.0, train_mlp=False), "cross_entropy",
           AdamConfig(learning_rate=3e-3, beta1=0.5, grad_clip_norm=2.0)),
)
STEPS = 10


def batch(tenant_index: int, step: int, part: int) -> list[DatumIn]:
    rng = np.random.default_rng([tenant_index, step, part])
    lengths = rng.integers(2, 9, size=2)
    return (ce_data if TENANTS[tenant_index].loss_name == "cross_entropy" else is_data)(rng, lengths)


def run_tenants(trainer: LoraTrainer, after_op: Callable[[], None] = lambda: None):
    """Five tenants trained interleaved, STEPS steps each. Each step: every tenant's first
    forward_backward (rotating order), a second accumulated forward_backward for half of them
    (reversed order), then every optim_step; with two slots, adapters are paged out holding
    pending gradients between their forward_backward calls and their optim_step.
    Returns (per-step losses per tenant, final state per tenant)."""
    for i, t in enumerate(TENANTS):
        trainer.create_adapter(t.name, t.spec)
        perturb_b(trainer, t.name, 100 + i)
        after_op()
    losses: dict[str, list[float]] = {t.name: [] for t in TENANTS}
    n = len(TENANTS)
    for step in range(STEPS):
        step_loss = dict.fromkeys(losses, 0.0)
        for i in [(step + k) % n for k in range(n)]:
            t = TENANTS[i]
            res = trainer.forward_backward(t.name, batch(i, step, 0), get_loss(t.loss_name), {})
            step_loss[t.name] += res.metrics["loss:sum"]
            after_op()
        for i in reversed(range(n)):
            if (i + step) % 2 == 0:
                t = TENANTS[i]
                res = trainer.forward_backward(t.name, batch(i, step, 1), get_loss(t.loss_name), {})
                step_loss[t.name] += res.metrics["loss:sum"]
                after_op()
        for i in [(2 * step + k) % n for k in range(n)]:
            trainer.optim_step(TENANTS[i].name, TENANTS[i].adam)
            after_op()
        for name, value in step_loss.items():
            losses[name].append(value)
    return losses, {t.name: state_of(trainer, t.name) for t in TENANTS}


@pytest.fixture(scope="module")
def unlimited_run(tiny_model_dir: Path):
    trainer = LoraTrainer(load_base_model(tiny_model_dir), INFO, pad_token_id=0)
    losses, final = run_tenants(trainer)
    assert trainer.pool_status().page_outs == 0
    return losses, final


def assert_same_run(got, want) -> None:
    (got_losses, got_final), (want_losses, want_final) = got, want
    for t in TENANTS:
        assert len(got_losses[t.name]) == STEPS
        np.testing.assert_allclose(got_losses[t.name], want_losses[t.name], atol=1e-6, rtol=0, err_msg=t.name)
        assert_bitwise(got_final[t.name], want_final[t.name])
        # the run trained: the weights moved far from the start and the losses changed
        assert len(set(want_losses[t.name])) == STEPS


@pytest.mark.slow  # 4-12 s each: the whole-run comparisons run in make test, not the quick tier
@pytest.mark.parametrize("shells", [0, 1, 64], ids=lambda n: f"{n}-shells")
def test_five_tenants_two_slots_match_unlimited(new_trainer, unlimited_run, shells: int) -> None:
    """With no shells every page-in rebuilds the peft adapter; with one, some do; with 64, none."""
    trainer = new_trainer(max_resident=2, max_shells=shells)
    pending_paged: list[int] = []

    def check() -> None:
        status = trainer.pool_status()
        assert len(status.resident) <= 2 and status.paged_on_disk == 0
        assert sum(p.shell is not None for p in trainer.pool._paged.values()) <= shells
        assert len(trainer.model.peft_config) <= 1 + len(status.resident) + shells  # idle + resident + shells
        pending_paged.append(sum(any(k.startswith("grad/") for k in p.tensors) for p in trainer.pool._paged.values()))

    got = run_tenants(trainer, check)
    assert_same_run(got, unlimited_run)
    status = trainer.pool_status()
    assert status.max_resident == 2 and len(status.resident) == 2 and status.paged_in_host == 3
    assert status.paged_on_disk == 0 and status.spills == 0
    assert status.page_outs >= STEPS * len(TENANTS)  # every step pages every tenant at least once
    assert status.page_ins == status.page_outs - len(TENANTS) + 2
    # adapters really were paged out holding pending gradients (three at once at some point)
    assert max(pending_paged) == 3


@pytest.mark.slow
def test_five_tenants_spilling_to_disk_match_unlimited(new_trainer, unlimited_run, tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    # Room in host memory for about one small adapter: the rest goes to disk.
    trainer = new_trainer(max_resident=2, host_budget_bytes=300_000, spill_dir=spill)
    on_disk: list[int] = []
    in_host: list[int] = []

    def check() -> None:
        status = trainer.pool_status()
        assert len(spill_files(spill)) == status.paged_on_disk  # one file per spilled adapter
        assert status.host_bytes <= 300_000
        on_disk.append(status.paged_on_disk)
        in_host.append(status.paged_in_host)

    got = run_tenants(trainer, check)
    assert_same_run(got, unlimited_run)
    status = trainer.pool_status()
    assert status.spills > STEPS and max(on_disk) >= 2 and max(in_host) >= 1
    assert status.paged_on_disk + status.paged_in_host == 3
    for t in TENANTS:
        trainer.remove_adapter(t.name)
    mine = trainer.pool.spill_dir
    assert spill_files(spill) == [] and [p.name for p in mine.iterdir()] == [LOCK_FILE]  # no temp files left either
    assert trainer.pool_status().host_bytes == 0


# ----- page-out and page-in ------------------------------------------------------------------------
@pytest.mark.parametrize("shells", [0, 64], ids=lambda n: f"{n}-shells")
@pytest.mark.parametrize("where", ["host", "disk"])
def test_page_in_restores_weights_grads_and_optimizer_bitwise(new_trainer, tmp_path: Path, where: str,
                                                              shells: int) -> None:
    pool = {"host_budget_bytes": 0, "spill_dir": tmp_path} if where == "disk" else {}
    trainer = new_trainer(max_resident=1, max_shells=shells, **pool)
    a = fresh(trainer, rank=8)
    train_a_bit(trainer, a, 1)
    before = state_of(trainer, a)
    assert any(v is not None for k, v in before.items() if k.startswith("g/")) and "exp_avg/" in "".join(before)

    b = fresh(trainer)  # pages a out
    assert trainer.pool_status().resident == (b,)
    assert trainer.has_adapter(a) and trainer.adapter_spec(a) == LoraSpec(rank=8, seed=8)
    assert spill_files(tmp_path) == ([trainer.pool._paged[a].path] if where == "disk" else [])
    assert trainer.pool_status().page_ins == 0  # has_adapter and adapter_spec do not page in

    assert_bitwise(state_of(trainer, a), before)
    assert trainer.pool_status().resident == (a,)
    # a's file was read back and deleted; b, paged out to make room, is the one on disk now
    assert spill_files(tmp_path) == ([trainer.pool._paged[b].path] if where == "disk" else [])


def test_paged_adapter_continues_exactly(new_trainer) -> None:
    """Pending gradients and moments survive paging: the next step equals the unpaged one."""
    paged, plain = new_trainer(max_resident=1), new_trainer()
    results = []
    for trainer in (paged, plain):
        a = fresh(trainer, rank=16)
        train_a_bit(trainer, a, 2)
        fresh(trainer)  # pages a out in `paged`
        trainer.optim_step(a, AdamConfig(learning_rate=1e-2, grad_clip_norm=0.1))
        results.append(state_of(trainer, a))
    assert paged.pool_status().page_outs == 2 and plain.pool_status().page_outs == 0
    assert_bitwise(*results)


def test_adapters_without_optimizer_or_gradients_page_exactly(new_trainer) -> None:
    trainer = new_trainer(max_resident=1)
    untouched = fresh(trainer, perturb=False)
    before = state_of(trainer, untouched)
    assert not bool(before["has_optimizer"])
    fresh(trainer)
    after = state_of(trainer, untouched)
    assert_bitwise(after, before)
    assert trainer._adapter(untouched).optimizer is None  # Adam starts afresh at its first step, as it would have


def test_paging_leaves_global_rng_alone(new_trainer, tmp_path: Path) -> None:
    trainer = new_trainer(max_resident=1, host_budget_bytes=0, spill_dir=tmp_path)
    a = fresh(trainer)
    train_a_bit(trainer, a, 3)
    state = torch.get_rng_state()
    b = fresh(trainer)
    for name in (a, b, a, b):
        trainer.forward_backward(name, ce_data(np.random.default_rng(0), (3,)), CE, {})
    assert trainer.pool_status().page_ins == 4
    assert torch.equal(torch.get_rng_state(), state)


def test_lru_order_and_pool_status_counts(new_trainer, tmp_path: Path) -> None:
    trainer = new_trainer(max_resident=2)
    assert trainer.pool_status() == PoolStatus(
        max_resident=2, resident=(), pinned=0, paged_in_host=0, paged_on_disk=0, host_bytes=0,
        page_ins=0, page_outs=0, spills=0,
    )
    a, b = fresh(trainer, rank=1), fresh(trainer, rank=2)
    trainer.forward_backward(a, ce_data(np.random.default_rng(0), (3,)), CE, {})  # a is now the most recent
    c = fresh(trainer, rank=4)  # pages out b, the least recently used
    status = trainer.pool_status()
    assert status.resident == (a, c) and status.paged_in_host == 1 and status.page_outs == 1
    assert status.host_bytes == trainer.pool._paged[b].nbytes > 0
    with trainer.using(b):  # pages b in, a out
        pass
    status = trainer.pool_status()
    assert status.resident == (c, b) and status.page_ins == 1 and status.page_outs == 2
    assert status.host_bytes == trainer.pool._paged[a].nbytes
    trainer.remove_adapter(c)  # frees a slot: nothing is paged in by it
    assert trainer.pool_status().resident == (b,) and trainer.pool_status().paged_in_host == 1

    unlimited = new_trainer()
    for _ in range(4):
        fresh(unlimited, perturb=False)
    status = unlimited.pool_status()
    assert status.max_resident is None and len(status.resident) == 4 and status.page_outs == 0


def test_host_budget_spills_least_recently_paged_first(new_trainer, tmp_path: Path) -> None:
    trainer = new_trainer(max_resident=1, host_budget_bytes=10**9, spill_dir=tmp_path)
    names = [fresh(trainer, rank=2) for _ in range(4)]  # all the same size
    assert trainer.pool_status().paged_in_host == 3 and spill_files(tmp_path) == []
    size = trainer.pool._paged[names[0]].nbytes
    trainer.pool.host_budget_bytes = 2 * size
    # names[0] comes in, names[3] goes out: names[1], names[2], names[3] paged, in that order, and
    # one of them must go to disk.
    trainer._adapter(names[0])
    status = trainer.pool_status()
    assert status.paged_in_host == 2 and status.paged_on_disk == 1 and status.host_bytes == 2 * size
    assert trainer.pool._paged[names[1]].path is not None  # least recently paged went to disk
    assert len(spill_files(tmp_path)) == 1


def test_remove_paged_and_spilled_adapters(new_trainer, tmp_path: Path) -> None:
    trainer = new_trainer(max_resident=1, host_budget_bytes=1, spill_dir=tmp_path)
    a, b, c = fresh(trainer), fresh(trainer), fresh(trainer)
    assert trainer.pool_status().paged_on_disk == 2 and len(spill_files(tmp_path)) == 2
    trainer.remove_adapter(a)
    assert not trainer.has_adapter(a) and len(spill_files(tmp_path)) == 1
    with pytest.raises(AdapterError):
        trainer.forward_backward(a, ce_data(np.random.default_rng(0), (3,)), CE, {})
    trainer.remove_adapter(b)
    trainer.remove_adapter(c)
    assert spill_files(tmp_path) == []
    assert trainer.pool_status().resident == () and trainer.pool_status().paged_on_disk == 0

    in_host = new_trainer(max_resident=1)
    d = fresh(in_host)
    e = fresh(in_host)
    in_host.remove_adapter(d)
    assert not in_host.has_adapter(d) and in_host.pool_status().paged_in_host == 0
    assert in_host.pool_status().host_bytes == 0
    in_host.create_adapter(d, LoraSpec(rank=4, seed=0))  # the name is free again
    assert in_host.pool_status().resident == (d,) and in_host.has_adapter(e)


def test_save_and_load_with_paged_adapters(new_trainer, tmp_path: Path) -> None:
    trainer = new_trainer(max_resident=1, host_budget_bytes=0, spill_dir=tmp_path / "spill")
    a = fresh(trainer, rank=8)
    train_a_bit(trainer, a, 4, pending=False)
    want = state_of(trainer, a)
    fresh(trainer)  # pages a out (to disk)
    trainer.save(a, tmp_path / "ckpt", with_optimizer=True)
    saved = load_file(str(tmp_path / "ckpt" / files.WEIGHTS_FILE))
    assert all(torch.equal(saved[k], want[f"w/{k}"]) for k in saved)
    opt = load_file(str(tmp_path / "ckpt" / files.OPTIMIZER_FILE))
    assert all(torch.equal(opt[k], want[k]) for k in opt if k.startswith("exp_avg"))

    # Load into an adapter that is paged out, and into a new one (which pages out the resident one).
    target = fresh(trainer, rank=8)
    fresh(trainer)
    assert target in trainer.pool._paged
    for name in (target, "brand-new"):
        assert trainer.load(name, tmp_path / "ckpt", with_optimizer=True) == LoraSpec(rank=8, seed=8)
        assert_bitwise(state_of(trainer, name), want)
    # A checkpoint of another shape is refused from the spec alone, without paging in.
    other = fresh(trainer, rank=2)
    fresh(trainer)
    ins = trainer.pool_status().page_ins
    with pytest.raises(AdapterError):
        trainer.load(other, tmp_path / "ckpt", with_optimizer=False)
    assert trainer.pool_status().page_ins == ins and other in trainer.pool._paged


# ----- shells and adapter switching ------------------------------------------------------------------
def test_shells_hold_no_tensors_and_the_least_recently_paged_lose_theirs(new_trainer) -> None:
    trainer = new_trainer(max_resident=1, max_shells=2)
    a = fresh(trainer)
    train_a_bit(trainer, a, 5)
    b, c, d = fresh(trainer), fresh(trainer), fresh(trainer)  # pages out a, then b, then c
    shells = {name: paged.shell for name, paged in trainer.pool._paged.items()}
    assert shells[a] is None and shells[b] is not None and shells[c] is not None
    assert set(trainer.model.peft_config) == {"idle", b, c, d}
    for param in shells[b].values():
        assert param.numel() == 0 and param.grad is None

    adds = []
    add = trainer.host.add
    trainer.host.add = lambda *args: (adds.append(args[0]), add(*args))[1]
    for name in (b, a):  # b comes back through its shell, a is rebuilt
        trainer.forward_backward(name, ce_data(np.random.default_rng(0), (3,)), CE, {})
    assert adds == [a]
    trainer.remove_adapter(c)  # a paged adapter with a shell: its peft modules go too
    assert c not in trainer.model.peft_config and not trainer.has_adapter(c)


def test_the_fast_adapter_switch_computes_what_peft_set_adapter_does(new_trainer, tiny_model_dir: Path) -> None:
    """LoraTrainer switches adapters without peft's set_adapter (which touches every adapter of
    every layer); a trainer that uses peft's own switch and disable_adapter computes the same bits."""
    ours, peft_switch = new_trainer(), new_trainer()

    def peft_using(trainer: LoraTrainer):
        @contextmanager
        def using(name):
            if name is None:
                with trainer.model.disable_adapter():
                    yield trainer.model
                return
            trainer._adapter(name)
            trainer.model.set_adapter(name)
            yield trainer.model

        return using

    peft_switch.using = peft_using(peft_switch)
    rng = np.random.default_rng(7)
    prompt = torch.from_numpy(rng.integers(3, VOCAB, (1, 6)))
    results = []
    for trainer in (ours, peft_switch):
        names = [fresh(trainer, rank) for rank in (2, 4, 8)]
        losses, base_logits = [], []
        for step in range(3):
            for i, name in enumerate(names):
                data = ce_data(np.random.default_rng([step, i]), (4, 3))
                losses.append(trainer.forward_backward(name, data, CE, {}).metrics["loss:sum"])
                grads = {n: any(p.grad is not None for p in trainer._adapter(n).params.values()) for n in names}
                assert grads == {n: n == name for n in names}  # only the active adapter got gradients
                trainer.optim_step(name, AdamConfig(learning_rate=1e-2))
            with torch.no_grad(), trainer.using(None) as model:
                base_logits.append(model(input_ids=prompt).logits)
        results.append((losses, base_logits, [state_of(trainer, n) for n in names]))
    (l1, b1, s1), (l2, b2, s2) = results
    assert l1 == l2 and all(torch.equal(x, y) for x, y in zip(b1, b2))
    for x, y in zip(s1, s2):
        assert_bitwise(x, y)
    with torch.no_grad():  # and "no adapter" is the bare base model
        assert torch.equal(b1[-1], load_base_model(tiny_model_dir)(input_ids=prompt).logits)


# ----- sampler adapters and settings -----------------------------------------------------------------
def test_pinned_sampler_adapters_are_outside_the_pool(new_trainer, tmp_path: Path) -> None:
    trainer = new_trainer(max_resident=1)
    source = fresh(trainer)
    trainer.save(source, tmp_path / "ckpt", with_optimizer=False)
    samplers = ["smp0", "smp1"]
    for name in samplers:
        trainer.load(name, tmp_path / "ckpt", with_optimizer=False, pinned=True)
    status = trainer.pool_status()
    assert status.resident == (source,) and status.pinned == 2 and status.page_outs == 0
    tenant = fresh(trainer)  # the tenant slot is taken by source, not by the samplers
    assert trainer.pool_status().resident == (tenant,) and trainer.pool_status().pinned == 2
    for name in samplers:  # least recently used of all, yet never paged
        with trainer.using(name):
            pass
    assert trainer.pool_status().resident == (tenant,) and not set(samplers) & set(trainer.pool._paged)
    assert trainer.pool_status().page_outs == 1
    trainer.remove_adapter("smp0")
    assert trainer.pool_status().pinned == 1


def test_settings_are_checked_and_stale_spill_files_removed(new_trainer, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        new_trainer(max_resident=0)
    with pytest.raises(ValueError):
        new_trainer(host_budget_bytes=10)
    with pytest.raises(ValueError):
        new_trainer(max_shells=-1)
    (tmp_path / "dead.spill.safetensors").write_bytes(b"left by a crashed process")
    (tmp_path / "dead.spill.safetensors.tmp").write_bytes(b"half written")
    (tmp_path / "not-ours.txt").write_text("kept")
    (tmp_path / "gone-instance").mkdir()  # a pool that is gone: nobody holds its lock
    (tmp_path / "gone-instance" / "x.spill.safetensors").write_bytes(b"left")
    live = new_trainer(max_resident=1, host_budget_bytes=0, spill_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["not-ours.txt", live.pool.spill_dir.name])
    # A second pool on the same folder (another process on the same data dir) leaves the first's alone.
    a = fresh(live)
    fresh(live)  # pages a out, to disk
    assert len(spill_files(live.pool.spill_dir)) == 1
    other = new_trainer(max_resident=1, host_budget_bytes=0, spill_dir=tmp_path)
    assert other.pool.spill_dir != live.pool.spill_dir and len(spill_files(live.pool.spill_dir)) == 1
    live.forward_backward(a, ce_data(np.random.default_rng(0), (3,)), CE, {})  # reads its spill back
