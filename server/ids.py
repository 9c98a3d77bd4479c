"""Identifiers and tinker:// paths.

Model ids must be "{session_id}:train:{model_seq_id}": the SDK's create_training_client_from_state
computes the id itself and never asks the server
(docs/tinker-protocol-notes.md, "Model ids the SDK computes"). The grammar of tinker:// paths:
(docs/tinker-protocol-notes.md, "tinker:// paths")."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from server.errors import InvalidRequest

# The SDK's path helpers know these three segments; the value is the checkpoint_type it reports.
SEGMENT_TO_KIND = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
KIND_TO_SEGMENT = {v: k for k, v in SEGMENT_TO_KIND.items()}


def new_id(prefix: str, nbytes: int = 12) -> str:
    return f"{prefix}-{secrets.token_hex(nbytes)}"


_NOT_NAME = re.compile(r"[^\w-]")


def native_model_id(session_id: str, adapter_name: str) -> str:
    """The training run of a native Twinkle adapter: one per (session, adapter name), named as
    Twinkle names it (`<session>-<name>`, the name with anything but word characters and '-' as '_')."""
    return f"{session_id}-{_NOT_NAME.sub('_', adapter_name)}"


def model_id(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def sampling_session_id(session_id: str, seq: int) -> str:
    return f"{session_id}:sample:{seq}"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # training | sampler | external
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{KIND_TO_SEGMENT[self.kind]}/{self.name}"

    @property
    def twinkle(self) -> str:
        """The same checkpoint as the native Twinkle API names it."""
        return f"twinkle://{self.model_id}/{KIND_TO_SEGMENT[self.kind]}/{self.name}"

    @property
    def checkpoint_id(self) -> str:
        return f"{KIND_TO_SEGMENT[self.kind]}/{self.name}"


# The native Twinkle API names the same checkpoints twinkle://… (docs/twinkle-native.md).
PATH_SCHEMES = ("tinker://", "twinkle://")


def parse_tinker_path(path: str, field: str = "path") -> TinkerPath:
    """A tinker:// (or twinkle://) checkpoint path."""
    prefix = next((p for p in PATH_SCHEMES if path.startswith(p)), None)
    if prefix is None:
        raise InvalidRequest(f"expected a tinker:// path, got {path!r}", field=field)
    parts = path[len(prefix) :].split("/")
    if len(parts) != 3 or not all(parts):
        raise InvalidRequest(
            f"expected tinker://<training_run_id>/<weights|sampler_weights>/<name>, got {path!r}", field=field
        )
    run, segment, name = parts
    if segment not in SEGMENT_TO_KIND:
        raise InvalidRequest(f"unknown checkpoint segment {segment!r} in {path!r}", field=field)
    return TinkerPath(model_id=run, kind=SEGMENT_TO_KIND[segment], name=name)
