"""Bodies of the futures endpoints beyond retrieve_future: the session completion feed
(`retrieve_futures`: docs/tinker-protocol-notes.md, "Completion feed of retrieve_futures"),
metadata-only answers and `cancel_future`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.tinker import RequestModel, ResponseModel


class SamplingSessionTarget(RequestModel):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: str
    cloned_sampler_id: int = Field(default=0, ge=0)  # seq_id // 1e9 of a cloned SamplingClient


class FuturesRetrieveRequest(RequestModel):
    target: SamplingSessionTarget
    prev_cursor: int = Field(default=0, ge=0)  # events at or before it are acknowledged
    timeout: float | None = Field(default=None, ge=0)  # None: long-poll; 0: answer at once
    retrieved_request_ids: list[str] = Field(default_factory=list)


class FutureCompletion(ResponseModel):
    state: Literal["finished", "failed"]
    request_id: str
    response_payload_uncompressed_size: int | None = None  # finished only


class FuturesRetrieveResponse(ResponseModel):
    completions: list[FutureCompletion]
    cursor: int


class CompleteMetadataResponse(ResponseModel):
    """retrieve_future's answer for a large result when the client allows metadata only."""

    status: Literal["complete_metadata"] = "complete_metadata"
    response_payload_size: int


class CancelFutureRequest(RequestModel):
    request_id: str
