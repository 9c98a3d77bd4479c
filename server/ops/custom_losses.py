"""Server-side custom losses: a session uploads a traced loss graph once (checked against the
interpreter's allow-list at upload), then its forward_backward calls name it by loss_id."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from schemas.custom_loss import CreateCustomLossRequest, CreateCustomLossResponse
from schemas.tinker import UntypedAPIFuture
from server import ids
from server.errors import InvalidRequest, NotFound
from server.kinds import OpKind
from server.ops.sessions import live_session
from server.queue.scheduler import OpResult, json_result
from server.queue.scopes import custom_loss_scope
from server.runtime import Runtime
from server.store.tables import CustomLossRow
from workers.custom_loss import CustomLossError, compile_graph
from workers.types import CustomLossSpec

log = logging.getLogger(__name__)


async def create(rt: Runtime, tenant_id: str, req: CreateCustomLossRequest, fingerprint: str) -> UntypedAPIFuture:
    await rt.db.run(lambda s: live_session(s, tenant_id, req.session_id))
    inputs = [i.model_dump() for i in req.inputs]
    try:
        compile_graph(req.graph, inputs, req.name)
    except CustomLossError as exc:
        raise InvalidRequest(str(exc), field="graph") from None
    loss_id = ids.new_id("loss")

    async def run() -> OpResult:
        def insert(s: Session) -> str:
            existing = s.scalar(select(CustomLossRow).where(
                CustomLossRow.session_id == req.session_id, CustomLossRow.seq == req.custom_loss_seq_id))
            if existing is not None:  # the same seq from a new body: the first upload stands
                return existing.id
            s.add(CustomLossRow(id=loss_id, tenant_id=tenant_id, session_id=req.session_id,
                                seq=req.custom_loss_seq_id, name=req.name, inputs=inputs, graph=req.graph))
            return loss_id

        stored = await rt.db.run(insert)
        log.info("custom_loss_created", extra={"loss_id": stored, "tenant_id": tenant_id, "loss_name": req.name})
        return json_result(CreateCustomLossResponse(loss_id=stored))

    sub = await rt.enqueue(
        tenant_id, kind=OpKind.CREATE_CUSTOM_LOSS, scope=custom_loss_scope(req.session_id),
        seq_id=req.custom_loss_seq_id, fingerprint=fingerprint, run=run,
    )
    return UntypedAPIFuture(request_id=sub.request_id)


async def spec_for(rt: Runtime, tenant_id: str, session_id: str, loss_id: object) -> CustomLossSpec:
    """The uploaded loss a forward_backward names; it must come from the model's own session."""
    if not isinstance(loss_id, str):
        raise InvalidRequest('loss_fn="custom" needs loss_fn_config {"loss_id": <id from create_custom_loss>}',
                             field="loss_fn_config.loss_id")

    def find(s: Session) -> CustomLossSpec:
        row = s.get(CustomLossRow, loss_id)
        if row is None or row.tenant_id != tenant_id or row.session_id != session_id:
            raise NotFound(f"custom loss {loss_id!r} not found in this model's session",
                           field="loss_fn_config.loss_id")
        return CustomLossSpec(loss_id=row.id, name=row.name, inputs=tuple((i["name"], i["rank"]) for i in row.inputs),
                              graph=row.graph)

    return await rt.db.run(find)
