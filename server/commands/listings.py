"""`twinkle runs` and `twinkle checkpoints list`: training runs and checkpoints, read from the
server's database directly (like `tenants` and `keys`), for every tenant or one."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server import ids
from server.commands.output import print_json, print_table, size, when
from server.store.queries import listed
from server.store.tables import Checkpoint, Model, RunMetric, Tenant
from server.store.tables import Session as SessionRow
from server.tenancy.tenants import tenant_id


def runs_action(tenant: str | None, as_json: bool) -> Callable[[Session], None]:
    def run(s: Session) -> None:
        tid = None if tenant is None else tenant_id(s, tenant)
        checkpoints = (
            select(Checkpoint.model_id, func.count().label("n"))
            .where(listed()).group_by(Checkpoint.model_id).subquery()
        )
        # Optimizer steps done: the run's curve counts them (server/tenancy/run_metrics.py).
        steps = select(RunMetric.model_id, func.max(RunMetric.step).label("n")).group_by(RunMetric.model_id).subquery()
        query = (
            select(Model, Tenant.name, SessionRow.finished_at, checkpoints.c.n, steps.c.n)
            .join(Tenant, Tenant.id == Model.tenant_id)
            .join(SessionRow, SessionRow.id == Model.session_id)
            .outerjoin(checkpoints, checkpoints.c.model_id == Model.id)
            .outerjoin(steps, steps.c.model_id == Model.id)
            .order_by(Model.created_at, Model.id)
        )
        if tid is not None:
            query = query.where(Model.tenant_id == tid)
        rows = [
            {
                "run_id": m.id, "tenant": name, "tenant_id": m.tenant_id, "base_model": m.base_model,
                "lora_rank": m.lora_rank, "created_at": m.created_at, "last_request_at": m.last_request_at,
                "steps": n_steps or 0, "checkpoints": n_ckpt or 0, "session_id": m.session_id,
                "session_live": finished is None, "copied_from": m.copied_from,
            }
            for m, name, finished, n_ckpt, n_steps in s.execute(query).all()
        ]
        if as_json:
            print_json(rows)
            return
        print_table(
            ["RUN", "TENANT", "BASE MODEL", "RANK", "CREATED", "LAST REQUEST", "STEPS", "CHECKPOINTS", "SESSION"],
            [[r["run_id"], r["tenant"], r["base_model"], r["lora_rank"], when(r["created_at"]),
              when(r["last_request_at"]), r["steps"], r["checkpoints"], "live" if r["session_live"] else "ended"]
             for r in rows],
        )

    return run


def checkpoints_action(tenant: str | None, run_id: str | None, as_json: bool) -> Callable[[Session], None]:
    def run(s: Session) -> None:
        tid = None if tenant is None else tenant_id(s, tenant)
        query = (
            select(Checkpoint, Tenant.name)
            .join(Tenant, Tenant.id == Checkpoint.tenant_id)
            .where(listed())
            .order_by(Checkpoint.created_at, Checkpoint.id)
        )
        if tid is not None:
            query = query.where(Checkpoint.tenant_id == tid)
        if run_id is not None:
            query = query.where(Checkpoint.model_id == run_id)
        rows = [
            {
                "path": str(ids.TinkerPath(c.model_id, c.kind, c.name)), "tenant": name, "tenant_id": c.tenant_id,
                "run_id": c.model_id, "kind": c.kind, "name": c.name, "size_bytes": c.size_bytes,
                "has_optimizer": c.has_optimizer, "public": c.public, "created_at": c.created_at,
                "expires_at": c.expires_at,
            }
            for c, name in s.execute(query).all()
        ]
        if as_json:
            print_json(rows)
            return
        print_table(
            ["PATH", "TENANT", "SIZE", "OPTIMIZER", "PUBLIC", "CREATED", "EXPIRES"],
            [[r["path"], r["tenant"], size(r["size_bytes"]), "yes" if r["has_optimizer"] else "no",
              "yes" if r["public"] else "no", when(r["created_at"]), when(r["expires_at"])] for r in rows],
        )

    return run
