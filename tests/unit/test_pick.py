"""server.queue.pick: choosing the next engine call, as a pure function of the board and the clock.

No database, no event loop: a test fills a Board, asks `pick` for calls, starts them with
`Board.take` and ends them with `Board.release`, in whatever order it likes.
"""

from __future__ import annotations

import math
import random

import pytest

from server.config import Settings
from server.kinds import Lane, OpKind
from server.queue.pick import (
    BARRIERS,
    NO_SEQ,
    Batch,
    Board,
    Call,
    NoThrottle,
    Op,
    OpResult,
    Pack,
    Throttle,
    Wait,
    pick,
)
from server.tenancy.quotas import Quotas

TWO_LANES = {Lane.TRAINING: 1, Lane.SAMPLING: 1}
GRACE = 5.0


async def _never() -> OpResult:  # pick never runs anything
    raise AssertionError("pick ran an op")


async def _never_many(payloads: list) -> list[OpResult]:
    raise AssertionError("pick ran a batch")


def op(name: str, seq: int | None = None, *, kind: str = OpKind.FORWARD_BACKWARD, batch: str | None = None,
       size: int = 1, budget: int = 4, cost: int = 0, at: float = 0.0) -> Op:
    group = None if batch is None else Batch(key=batch, size=size, budget=budget, payload=name, run=_never_many)
    return Op(NO_SEQ if seq is None else seq, name, kind, _never, group, cost=cost, queued_at=at)


def sample(name: str, **kw) -> Op:
    return op(name, kind=OpKind.SAMPLE, **kw)


def model_ops(board: Board, key: str, seqs: list[int], tenant: str = "", **kw) -> None:
    for seq in seqs:
        board.add(key, op(f"{key}#{seq}", seq, **kw), tenant=tenant, ordered=True)


def names(call: Call) -> list[str]:
    return [o.request_id for o in call.ops]


def step(board: Board, now: float = 0.0, throttle: Throttle | None = None) -> Call | Wait:
    return pick(board, now, throttle=throttle or NoThrottle(), grace=GRACE)


def start(board: Board, call: Call, now: float = 0.0, throttle: Throttle | None = None) -> list[str]:
    board.take(call)
    for tenant, cost in call.costs().items():
        (throttle or NoThrottle()).charge(tenant, cost, now)
    return names(call)


def drain(board: Board, now: float = 0.0, throttle: Throttle | None = None) -> list[list[str]]:
    """Start, and at once end, every call that may start at `now`, one after the other."""
    calls = []
    while isinstance(call := step(board, now, throttle), Call):
        calls.append(start(board, call, now, throttle))
        board.release(call)
    return calls


# --------------------------------------------------------------------------------------------
# Purity


def snapshot(board: Board) -> tuple:
    return (
        {k: (list(q.ops), q.expected, set(q.skipped), q.lane) for k, q in board.queues.items()},
        {lane: list(t) for lane, t in board.turns.items()},
        {k: list(v) for k, v in board.keys.items()},
        set(board.busy), dict(board.running), list(board.lane_turns),
    )


def test_pick_changes_nothing_and_gives_the_same_answer_twice() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "model:a", [2, 1, 3], tenant="A", batch="ce")
    model_ops(board, "model:b", [1], tenant="B")
    board.skip("model:b", 4, "B")
    board.add("sample:C", sample("c0", batch="ckpt"), tenant="C", ordered=False)
    before = snapshot(board)
    first, second = step(board), step(board)
    assert isinstance(first, Call) and names(first) == names(second) == ["model:a#1", "model:a#2", "model:a#3"]
    assert snapshot(board) == before


def test_an_empty_board_waits_for_something_to_happen() -> None:
    assert step(Board(lanes=TWO_LANES)) == Wait(None)


# --------------------------------------------------------------------------------------------
# Order, gaps, skip


def test_an_ordered_queue_runs_in_seq_id_order_whatever_the_arrival_order() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [5, 3, 1, 4, 2, 7, 6])
    assert drain(board) == [[f"m#{s}"] for s in range(1, 8)]
    assert board.queues["m"].expected == 8  # an ordered queue remembers where it is


def test_a_missing_seq_id_is_waited_for_gap_grace_seconds_then_given_up() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [2, 3], at=10.0)  # seq_id 1 never comes
    assert step(board, now=12.0) == Wait(10.0 + GRACE)
    call = step(board, now=15.0)
    assert isinstance(call, Call) and names(call) == ["m#2"] and call.gap == (1, 2)
    start(board, call, now=15.0)
    board.release(call)
    assert drain(board, now=15.0) == [["m#3"]]


@pytest.mark.parametrize("kind", sorted(BARRIERS))
def test_a_barrier_never_runs_past_a_missing_seq_id(kind: str) -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [2], at=10.0, kind=kind)  # seq_id 1, a forward_backward, has not come
    assert step(board, now=10.0 + 1000 * GRACE) == Wait(math.inf)
    model_ops(board, "m", [1], at=20.0)  # it comes: both run, in order
    assert drain(board, now=20.0) == [["m#1"], ["m#2"]]
    model_ops(board, "m", [4], at=30.0, kind=kind)
    assert board.skip("m", 3, "")  # or it is refused, and the server sees the refusal
    assert drain(board, now=30.0) == [["m#4"]]


def test_a_skipped_seq_id_is_not_waited_for() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [3], at=0.0)
    assert isinstance(step(board), Wait)
    assert board.skip("m", 1, "") and board.skip("m", 2, "")
    assert drain(board) == [["m#3"]]
    assert not board.skip("m", 2, "")  # already past


def test_removing_a_queued_op_skips_its_seq_id() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [1, 2, 3])
    removed = board.remove("m#2")
    assert removed is not None and removed.seq_id == 2 and board.remove("m#2") is None
    assert drain(board) == [["m#1"], ["m#3"]]


# --------------------------------------------------------------------------------------------
# Batching and merging


def test_batches_are_contiguous_seq_ids_of_one_key_within_the_budget() -> None:
    board = Board(lanes=TWO_LANES)
    for seq, key, size in [(1, "ce", 1), (2, "ce", 2), (3, "ppo", 1), (4, "ppo", 3), (5, "ppo", 1), (6, "ce", 1)]:
        board.add("m", op(f"m#{seq}", seq, batch=key, size=size), tenant="", ordered=True)
    assert drain(board) == [["m#1", "m#2"], ["m#3", "m#4"], ["m#5"], ["m#6"]]


def test_an_ordered_batch_stops_at_a_missing_seq_id() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [1, 2, 4], batch="ce")
    call = step(board)
    assert isinstance(call, Call) and names(call) == ["m#1", "m#2"]


def test_samples_of_several_tenants_on_one_checkpoint_share_a_call() -> None:
    board = Board(lanes=TWO_LANES)
    for n in range(3):
        board.add("sample:A:ck", sample(f"A{n}", batch="ck", budget=8), tenant="A", ordered=False)
    board.add("sample:B:ck", sample("B0", batch="ck", budget=8), tenant="B", ordered=False)
    board.add("sample:B:other", sample("B-other", batch="other", budget=8), tenant="B", ordered=False)
    call = step(board)
    assert isinstance(call, Call) and names(call) == ["A0", "A1", "A2", "B0"]
    assert call.costs() == {"A": 0, "B": 0} and [t.key for t in call.takes] == ["sample:A:ck", "sample:B:ck"]
    start(board, call)
    assert "sample:A:ck" not in board.queues  # emptied unordered queues are forgotten
    board.release(call)
    assert drain(board) == [["B-other"]]


def test_a_merge_respects_the_budget_and_leaves_a_busy_queue_alone() -> None:
    board = Board(lanes={Lane.TRAINING: 1, Lane.SAMPLING: 2})
    board.add("sample:A:ck", sample("A0", batch="ck", budget=3, size=2), tenant="A", ordered=False)
    board.add("sample:B:ck", sample("B0", batch="ck", budget=3, size=2), tenant="B", ordered=False)
    board.add("sample:C:ck", sample("C0", batch="ck", budget=3, size=1), tenant="C", ordered=False)
    first = step(board)
    assert isinstance(first, Call) and names(first) == ["A0", "C0"]  # B0 would go over the budget
    start(board, first)
    board.add("sample:C:ck", sample("C1", batch="ck", budget=3, size=1), tenant="C", ordered=False)
    second = step(board)
    assert isinstance(second, Call) and names(second) == ["B0"]  # C's queue has a call under way


# --------------------------------------------------------------------------------------------
# Packing: several models' forward(_backward) in one call


async def _never_packed(parts: list) -> list:
    raise AssertionError("pick ran a packed call")


def packable(name: str, seq: int, *, loss: str = "ce", size: int = 1, budget: int = 10, queues: int = 8,
             base: str = "base", cost: int = 0) -> Op:
    pack = Pack(key=base, budget=budget, max_queues=queues, item=name.split("#")[0], run=_never_packed)
    group = Batch(key=loss, size=size, budget=4, payload=name, run=_never_many, pack=pack)
    return Op(seq, name, OpKind.FORWARD_BACKWARD, _never, group, cost=cost)


def add_packable(board: Board, key: str, seqs: list[int], tenant: str = "", **kw) -> None:
    for seq in seqs:
        board.add(key, packable(f"{key}#{seq}", seq, **kw), tenant=tenant, ordered=True)


def test_due_heads_of_other_models_on_one_base_join_the_call_each_with_its_neighbours() -> None:
    board = Board(lanes=TWO_LANES)
    add_packable(board, "a", [1, 2], tenant="A")
    add_packable(board, "b", [1], tenant="B", loss="ppo")  # another loss: its own part of the pass
    add_packable(board, "c", [1], tenant="C", base="other")  # another base model: another engine
    model_ops(board, "d", [1], tenant="D")  # no pack (packing off, or not a forward_backward)
    call = step(board)
    assert isinstance(call, Call) and call.packed
    assert [t.key for t in call.takes] == ["a", "b"] and names(call) == ["a#1", "a#2", "b#1"]
    start(board, call)
    assert board.busy == {"a", "b"} and board.queues["b"].expected == 2  # b's order moved on
    board.release(call)
    assert drain(board) == [["c#1"], ["d#1"]]


def test_a_head_that_waits_for_a_missing_seq_id_or_a_barrier_behind_is_not_packed() -> None:
    board = Board(lanes=TWO_LANES)
    add_packable(board, "a", [1], tenant="A")
    add_packable(board, "b", [2], tenant="B")  # b#1 has not arrived: b waits, even past the grace
    board.add("c", op("c#1", 1, kind=OpKind.OPTIM_STEP), tenant="C", ordered=True)
    add_packable(board, "c", [2], tenant="C")  # behind c's optimizer step
    call = step(board, now=GRACE * 2)
    assert isinstance(call, Call) and names(call) == ["a#1"] and not call.packed


def test_a_pack_stays_within_its_budget_and_queue_count_and_leaves_busy_models_alone() -> None:
    board = Board(lanes={Lane.TRAINING: 2, Lane.SAMPLING: 1})
    add_packable(board, "a", [1], tenant="A", size=4, budget=10, queues=3)
    add_packable(board, "b", [1, 2], tenant="B", size=4, budget=10, queues=3)  # only b#1 fits: 8 of 10
    add_packable(board, "c", [1], tenant="C", size=1, budget=10, queues=3)
    add_packable(board, "d", [1], tenant="D", size=1, budget=10, queues=3)  # a fourth queue: over the count
    call = step(board)
    assert isinstance(call, Call) and names(call) == ["a#1", "b#1", "c#1"]
    start(board, call)
    add_packable(board, "a", [2], tenant="A", size=1)
    second = step(board)
    assert isinstance(second, Call) and names(second) == ["d#1"]  # a, b and c have a call under way


def test_a_throttled_tenant_rides_along_in_a_pack_only_within_its_budget() -> None:
    throttle = OneTokenBudget()  # "slow" may spend one token
    board = Board(lanes=TWO_LANES)
    add_packable(board, "fast", [1], tenant="fast", cost=1)
    add_packable(board, "slow", [1], tenant="slow", cost=1)
    add_packable(board, "slow2", [1], tenant="slow", cost=1)
    call = step(board, throttle=throttle)
    assert isinstance(call, Call) and names(call) == ["fast#1", "slow#1"]


# --------------------------------------------------------------------------------------------
# Fairness


def test_tenants_take_turns_and_so_do_a_tenants_models() -> None:
    board = Board(lanes=TWO_LANES)
    for key, n in (("A1", 3), ("A2", 2)):
        model_ops(board, key, list(range(1, n + 1)), tenant="A")
    model_ops(board, "B1", [1, 2], tenant="B")
    owners = [c[0].split("#")[0] for c in drain(board)]
    assert owners == ["A1", "B1", "A2", "B1", "A1", "A2", "A1"]


def test_a_flooding_tenant_delays_a_light_one_by_one_call_per_other_tenant_with_two_slots() -> None:
    """Two training calls at once. A floods three models and C two; B's op arrives while two
    calls run: it starts after at most one call each of A and C (the calls running when it arrived
    only take its slot)."""
    board = Board(lanes={Lane.TRAINING: 2, Lane.SAMPLING: 1})
    for model in ("a1", "a2", "a3"):
        model_ops(board, model, list(range(1, 7)), tenant="A")
    for model in ("c1", "c2"):
        model_ops(board, model, list(range(1, 7)), tenant="C")
    running: list[Call] = []
    for _ in range(2):
        call = step(board)
        assert isinstance(call, Call)
        start(board, call)
        running.append(call)
    assert step(board) == Wait(None)  # the lane is full
    model_ops(board, "b", [1], tenant="B")
    started: list[str] = []
    while "b#1" not in started:
        board.release(running.pop(0))  # the oldest call ends
        call = step(board)
        assert isinstance(call, Call)
        started += start(board, call)
        running.append(call)
    others = [name.split("#")[0][0] for name in started[:-1]]
    assert len(others) <= 2 and len(set(others)) == len(others), started


def test_per_lane_no_tenant_runs_twice_while_a_backlogged_tenant_waits() -> None:
    """Random call lengths, three slots: a tenant that always has a ready model waits for at most
    one call of every other tenant (before its first call, and between two of its calls)."""
    for seed in range(20):
        rng = random.Random(seed)
        slots = 3
        board = Board(lanes={Lane.TRAINING: slots, Lane.SAMPLING: 1})
        tenants = "ABCD"
        for tenant in tenants:  # more models than slots: a tenant never waits for its own models
            for m in range(slots + 1):
                model_ops(board, f"{tenant}{m}", list(range(1, rng.randint(4, 12))), tenant=tenant)
        running: list[Call] = []
        order: list[str] = []
        while all(q.ops for q in board.queues.values()):  # until a tenant could run out of ready models
            while isinstance(call := step(board), Call):
                order.append(start(board, call)[0][0])
                running.append(call)
            board.release(running.pop(rng.randrange(len(running))))
        assert len(order) > 20
        for tenant in tenants:  # before its first call, between two, and after its last one
            marks = [-1, *(i for i, t in enumerate(order) if t == tenant), len(order)]
            for a, b in zip(marks, marks[1:]):
                between = order[a + 1 : b]
                assert len(between) == len(set(between)) and tenant not in between, (seed, tenant, order)


# --------------------------------------------------------------------------------------------
# Lanes


def test_a_model_with_a_call_under_way_waits_even_with_room_in_the_lane() -> None:
    board = Board(lanes={Lane.TRAINING: 4, Lane.SAMPLING: 1})
    model_ops(board, "m", [1, 2])
    model_ops(board, "n", [1])
    first = step(board)
    assert isinstance(first, Call)
    start(board, first)
    second = step(board)
    assert isinstance(second, Call) and names(second) == ["n#1"]  # not m#2: m is busy
    start(board, second)
    assert step(board) == Wait(None)
    board.release(first)
    third = step(board)
    assert isinstance(third, Call) and names(third) == ["m#2"]


def test_lanes_fill_independently_up_to_their_capacity() -> None:
    board = Board(lanes={Lane.TRAINING: 2, Lane.SAMPLING: 1})
    for tenant in "ABC":
        model_ops(board, f"model:{tenant}", [1], tenant=tenant)
        board.add(f"sample:{tenant}", sample(f"s{tenant}", batch=f"ck{tenant}"), tenant=tenant, ordered=False)
    calls = []
    while isinstance(call := step(board), Call):
        start(board, call)
        calls.append(call)
    assert sorted(c.lane for c in calls) == [Lane.SAMPLING, Lane.TRAINING, Lane.TRAINING]
    assert board.running == {Lane.TRAINING: 2, Lane.SAMPLING: 1}
    assert step(board) == Wait(None)
    board.release(next(c for c in calls if c.lane == Lane.SAMPLING))
    nxt = step(board)
    assert isinstance(nxt, Call) and nxt.lane == Lane.SAMPLING  # training is still full


def test_a_sample_starts_while_the_training_lane_is_full() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "model:a", [1, 2], tenant="A")
    training = step(board)
    assert isinstance(training, Call) and training.lane == Lane.TRAINING
    start(board, training)
    board.add("sample:B", sample("b0", batch="ck"), tenant="B", ordered=False)
    nxt = step(board)
    assert isinstance(nxt, Call) and nxt.lane == Lane.SAMPLING and names(nxt) == ["b0"]


def test_a_queue_takes_the_lane_of_its_ops() -> None:
    board = Board(lanes=TWO_LANES)
    board.add("session:s", op("create", 1, kind=OpKind.CREATE_MODEL), tenant="A", ordered=False)
    board.add("sample:A", sample("s0"), tenant="A", ordered=False)
    assert board.queues["session:s"].lane == Lane.TRAINING and board.queues["sample:A"].lane == Lane.SAMPLING
    assert set(board.turns) == {Lane.TRAINING, Lane.SAMPLING}


# --------------------------------------------------------------------------------------------
# Throttling


class OneTokenBudget:
    """Tenant "slow" may spend one token, ever; "fast" is never throttled."""

    def __init__(self) -> None:
        self.spent = 0

    def ready_at(self, tenant: str, cost: int, now: float) -> float:
        return now + 3600 if tenant == "slow" and self.spent + cost > 1 else now

    def charge(self, tenant: str, cost: int, now: float) -> None:
        if tenant == "slow":
            self.spent += cost

    def reason(self, tenant: str, cost: int, now: float) -> str:
        return "over" if self.ready_at(tenant, cost, now) > now else ""


def test_a_throttled_tenant_is_passed_over_and_says_until_when() -> None:
    throttle = OneTokenBudget()
    board = Board(lanes=TWO_LANES)
    model_ops(board, "model:s", [1, 2], tenant="slow", cost=1)
    model_ops(board, "model:f", [1], tenant="fast", cost=1)
    assert drain(board, throttle=throttle) == [["model:s#1"], ["model:f#1"]]
    assert step(board, throttle=throttle) == Wait(3600.0)


def test_a_throttled_tenants_samples_do_not_ride_along_in_another_tenants_call() -> None:
    throttle = OneTokenBudget()
    throttle.spent = 1
    board = Board(lanes=TWO_LANES)
    board.add("sample:slow", sample("slow1", batch="base", cost=1), tenant="slow", ordered=False)
    board.add("sample:fast", sample("fast0", batch="base", cost=1), tenant="fast", ordered=False)
    assert drain(board, throttle=throttle) == [["fast0"]]


def test_a_merged_tenant_rides_along_only_as_far_as_its_budget_goes() -> None:
    throttle = OneTokenBudget()
    board = Board(lanes=TWO_LANES)
    board.add("sample:fast", sample("fast0", batch="base", cost=1), tenant="fast", ordered=False)
    for n in range(3):
        board.add("sample:slow", sample(f"slow{n}", batch="base", cost=1), tenant="slow", ordered=False)
    assert drain(board, throttle=throttle) == [["fast0", "slow0"]]


def _window_quotas(now: float) -> Quotas:
    quotas = Quotas(Settings(rate_window_seconds=10))
    quotas.set_limits("T", {"tokens_per_second": 10}, now=now)  # 100 tokens per 10 s
    return quotas


def test_a_stream_of_small_ops_cannot_starve_a_big_one_under_the_tokens_budget() -> None:
    """A 90-token forward_backward waits while the tenant's 20-token samples arrive every second.
    It runs once the window has room for it, and the samples wait behind it (in their own lane)."""
    quotas = _window_quotas(0)
    board = Board(lanes=TWO_LANES)
    board.add("model:A", op("big", 1, cost=90), tenant="T", ordered=True)
    quotas.charge("T", 20, -1)  # something ran just before
    picked: list[tuple[int, str]] = []
    for second in range(30):
        board.add("sample:T:ck", sample(f"s{second}", cost=20, at=second), tenant="T", ordered=False)
        picked += [(second, name) for call in drain(board, float(second), quotas) for name in call]
    ran_big = next(t for t, name in picked if name == "big")
    assert ran_big <= 10  # as soon as the earlier 20 tokens left the window
    assert all(name != "s0" for t, name in picked if t < ran_big), picked
    assert [name for _, name in picked][0] == "big"


def test_with_the_big_op_in_a_full_lane_the_tenant_samples_meanwhile() -> None:
    """The oldest op holds the tenant's others back only while it could start but for its budget."""
    quotas = _window_quotas(0)
    board = Board(lanes=TWO_LANES)
    model_ops(board, "model:other", [1], tenant="U")
    busy = step(board, throttle=quotas)
    assert isinstance(busy, Call)
    start(board, busy, throttle=quotas)  # the training lane is full
    board.add("model:A", op("big", 1, cost=90), tenant="T", ordered=True)
    quotas.charge("T", 20, -1)
    board.add("sample:T:ck", sample("s0", cost=20), tenant="T", ordered=False)
    call = step(board, throttle=quotas)
    assert isinstance(call, Call) and names(call) == ["s0"]


def test_one_call_in_all_when_the_lanes_share_one_thread_and_the_lanes_alternate() -> None:
    """An engine whose lanes share one compute thread (max_calls=1): a sample is not started while
    a training call runs (it would only wait inside the engine, unbatched and uncancellable), but
    it goes first once that call ends, before the next training op."""
    board = Board(lanes=TWO_LANES, max_calls=1)
    model_ops(board, "model:a", [1, 2], tenant="a")
    first = step(board)
    assert isinstance(first, Call) and start(board, first) == ["model:a#1"]
    for name in ("s1", "s2"):
        board.add("sample:b", sample(name, batch="ckpt", size=1, budget=4), tenant="b", ordered=False)
    assert step(board) == Wait(None)  # the one thread is busy: nothing else starts
    board.release(first)
    second = step(board)
    assert isinstance(second, Call) and second.lane == Lane.SAMPLING and start(board, second) == ["s1", "s2"]
    board.release(second)
    assert drain(board) == [["model:a#2"]]
