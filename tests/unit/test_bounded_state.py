"""In-memory state that would grow with every session, run or loss is bounded or dropped: a
model's ordered queue goes with its session, idle completion feeds are dropped, compiled custom
losses are an LRU cache."""

from __future__ import annotations

from pathlib import Path

from server.engine import local
from server.engine.local import LocalEngine
from server.queue import feeds as feeds_module
from server.queue.feeds import CompletionFeeds
from server.queue.pick import Board
from tests.unit.test_custom_loss import neg_ll, wire
from tests.unit.test_pick import TWO_LANES, drain, model_ops
from workers.types import CustomLossSpec


def test_an_ended_models_queue_is_forgotten_only_when_idle() -> None:
    board = Board(lanes=TWO_LANES)
    model_ops(board, "m", [1, 2])
    assert not board.forget("m")  # it still holds work
    drain(board)
    assert board.queues["m"].expected == 3  # an idle ordered queue remembers its next seq_id...
    assert board.forget("m") and "m" not in board.queues  # ...until its model has ended
    assert not board.forget("m")


def test_idle_feeds_are_dropped(monkeypatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(feeds_module.time, "monotonic", lambda: clock[0])
    feeds = CompletionFeeds()
    feeds.publish(("t", "s", 0), {"request_id": "a"})
    feeds.publish(("t", "s", 1), {"request_id": "b"})
    clock[0] += feeds_module.IDLE_SECONDS - 10
    feeds.publish(("t", "s", 1), {"request_id": "c"})  # this one stays in use
    clock[0] += feeds_module.SWEEP_SECONDS + 10
    feeds.publish(("t", "s", 2), {"request_id": "d"})  # a sweep: the first feed has been idle an hour
    assert len(feeds) == 2


def test_compiled_custom_losses_are_a_bounded_lru(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(local, "CUSTOM_LOSS_CACHE", 2)
    engine = LocalEngine(lambda: tiny_model_dir, "tiny-qwen3", local.ComputeOptions(torch_threads=1),
                         local.FolderStore(tmp_path))
    graph, inputs = wire(neg_ll, {"logprobs": 1, "weights": 1})
    spec = {i: CustomLossSpec(f"loss-{i}", "neg_ll", tuple((x["name"], x["rank"]) for x in inputs), graph)
            for i in range(3)}
    first = engine._custom_loss(spec[0])
    engine._custom_loss(spec[1])
    assert engine._custom_loss(spec[0]) is first  # used again: now the most recent
    engine._custom_loss(spec[2])
    assert list(engine._custom_losses) == ["loss-0", "loss-2"]
