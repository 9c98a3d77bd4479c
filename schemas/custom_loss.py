"""Bodies of server-side custom losses (docs/tinker-protocol-notes.md, "Server-side custom losses"):
`create_custom_loss` uploads a torch.fx graph that
`forward_backward(loss_fn="custom", loss_fn_config={"loss_id": ...})` then runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from schemas.tinker import RequestModel, ResponseModel


class CustomLossInput(RequestModel):
    name: str
    rank: int = Field(ge=0, le=2)


class CreateCustomLossRequest(RequestModel):
    session_id: str
    custom_loss_seq_id: int = Field(ge=0)
    name: str = Field(min_length=1, max_length=200)
    inputs: list[CustomLossInput]
    graph: dict[str, Any]  # {"format": 1, "nodes": [...]}; checked node by node by the interpreter
    type: Literal["create_custom_loss"] = "create_custom_loss"


class CreateCustomLossResponse(ResponseModel):
    loss_id: str
    type: Literal["create_custom_loss"] = "create_custom_loss"
