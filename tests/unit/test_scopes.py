"""server/queue/scopes.py: the names are what the futures table already holds (changing one would
strand stored futures), and a session's scopes cover every scope its work is submitted under."""

from __future__ import annotations

from server.queue import scopes


def test_names_are_the_stored_ones() -> None:
    assert scopes.model_scope("sess-1:train:0") == "model:sess-1:train:0"
    assert scopes.session_scope("sess-1") == "session:sess-1"
    assert scopes.custom_loss_scope("sess-1") == "session:sess-1:custom_loss"
    assert scopes.sampler_scope("sess-1:sample:2") == "sampler:sess-1:sample:2"


def test_samples_without_a_session_or_checkpoint_have_fixed_names() -> None:
    assert scopes.sampler_scope(None) == "sampler:direct"
    assert scopes.sample_queue("ten-a", None) == "sample:ten-a:base"
    assert scopes.sample_batch_key(None) == "sample:base"


def test_sample_queue_is_per_tenant_and_the_batch_key_is_not() -> None:
    ckpt = "checkpoints/ten-a/ckpt-1"
    assert scopes.sample_queue("ten-a", ckpt) == f"sample:ten-a:{ckpt}"
    assert scopes.sample_queue("ten-a", ckpt) != scopes.sample_queue("ten-b", ckpt)
    assert scopes.sample_batch_key(ckpt) == f"sample:{ckpt}"


def test_session_scopes_cover_every_submission_scope_of_the_session() -> None:
    found = scopes.session_scopes("s", ["s:train:0", "s:train:1"], ["s:sample:0"])
    assert found == [
        "session:s", "session:s:custom_loss", "model:s:train:0", "model:s:train:1", "sampler:s:sample:0",
    ]
    assert scopes.session_scopes("s", [], []) == [scopes.session_scope("s"), scopes.custom_loss_scope("s")]
