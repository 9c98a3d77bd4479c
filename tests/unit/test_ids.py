"""server.ids: identifiers the SDK computes or parses itself (docs/tinker-protocol-notes.md,
"Model ids the SDK computes" and "tinker:// paths"), and API-key hashing."""

from __future__ import annotations

import hashlib
import re

import pytest
from tinker.types.checkpoint import ParsedCheckpointTinkerPath

from server import ids
from server.errors import InvalidRequest
from server.ids import TinkerPath, parse_tinker_path

SEGMENTS = [("weights", "training"), ("sampler_weights", "sampler"), ("external_weights", "external")]


@pytest.mark.parametrize(("segment", "kind"), SEGMENTS)
def test_parse_accepts_the_three_segments(segment: str, kind: str) -> None:
    path = f"tinker://sess-1:train:0/{segment}/ckpt-7"
    parsed = parse_tinker_path(path)
    assert parsed == TinkerPath(model_id="sess-1:train:0", kind=kind, name="ckpt-7")
    # The SDK parses the same path the same way (types/checkpoint.py).
    sdk = ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert (sdk.training_run_id, sdk.checkpoint_type, sdk.checkpoint_id) == (
        parsed.model_id,
        parsed.kind,
        parsed.checkpoint_id,
    )


@pytest.mark.parametrize(("segment", "kind"), SEGMENTS)
def test_str_and_checkpoint_id_round_trip(segment: str, kind: str) -> None:
    path = TinkerPath(model_id="abc:train:3", kind=kind, name="step_0010")
    assert str(path) == f"tinker://abc:train:3/{segment}/step_0010"
    assert path.checkpoint_id == f"{segment}/step_0010"
    assert parse_tinker_path(str(path)) == path


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("http://m/weights/c", "scheme"),
        ("tinker:/m/weights/c", "scheme"),
        ("TINKER://m/weights/c", "scheme"),
        ("m/weights/c", "scheme"),
        ("", "scheme"),
        ("tinker://m/weights", "parts"),
        ("tinker://m", "parts"),
        ("tinker://m/weights/c/d", "parts"),
        ("tinker://m/weights/c/", "parts"),
        ("tinker:///weights/c", "empty"),
        ("tinker://m//c", "empty"),
        ("tinker://m/weights/", "empty"),
        ("tinker://", "empty"),
        ("tinker://m/checkpoints/c", "segment"),
        ("tinker://m/Weights/c", "segment"),
        ("tinker://m/training/c", "segment"),
    ],
)
def test_parse_rejects_malformed_paths(path: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_tinker_path(path, field="model_path")
    err = info.value
    assert err.field == "model_path"
    assert err.kind == "invalid" and err.category == "user"
    assert repr(path) in err.message  # the message quotes what was sent
    if reason == "scheme":
        assert "tinker://" in err.message
    if reason == "segment":
        assert "segment" in err.message


def test_a_twinkle_path_names_the_same_checkpoint() -> None:
    """The native Twinkle API's twinkle:// paths and Tinker's tinker:// paths are one namespace."""
    tinker = parse_tinker_path("tinker://sess-1-A/sampler_weights/final")
    twinkle = parse_tinker_path("twinkle://sess-1-A/sampler_weights/final")
    assert tinker == twinkle
    assert twinkle.twinkle == "twinkle://sess-1-A/sampler_weights/final"
    with pytest.raises(InvalidRequest):
        parse_tinker_path("twinkles://sess-1-A/weights/x")


def test_parse_default_field_is_path() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_tinker_path("nope")
    assert info.value.field == "path"


def test_model_id_matches_what_the_sdk_computes() -> None:
    # tinker service_client.create_training_client_from_state: f"{session_id}:train:{model_seq_id}"
    assert ids.model_id("sess-abc", 0) == "sess-abc:train:0"
    assert ids.model_id("sess-abc", 12) == "sess-abc:train:12"


def test_sampling_session_id_format() -> None:
    assert ids.sampling_session_id("sess-abc", 0) == "sess-abc:sample:0"
    assert ids.sampling_session_id("sess-abc", 5) == "sess-abc:sample:5"


def test_ids_are_usable_as_first_path_segment() -> None:
    session_id = ids.new_id("sess")
    mid = ids.model_id(session_id, 1)
    assert "/" not in mid
    path = TinkerPath(model_id=mid, kind="sampler", name="s1")
    assert parse_tinker_path(str(path)).model_id == mid


def test_new_id_is_prefixed_and_unique() -> None:
    made = {ids.new_id("req") for _ in range(1000)}
    assert len(made) == 1000
    assert all(re.fullmatch(r"req-[0-9a-f]{24}", x) for x in made)
    assert re.fullmatch(r"x-[0-9a-f]{8}", ids.new_id("x", nbytes=4))


def test_hash_key_is_sha256_hex_and_never_contains_the_key() -> None:
    key = "tml-Secret-Key-With-Non-Hex-Letters-zzz"
    digest = ids.hash_key(key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert key not in digest and key.lower() not in digest
    assert ids.hash_key(key) == digest  # deterministic: it is what the tenants table is looked up by
    assert ids.hash_key(key + "x") != digest
    assert ids.hash_key("ключ-🔑") == hashlib.sha256("ключ-🔑".encode()).hexdigest()
