"""The FastAPI application."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import errors
from gateway.forwarding import Forwarder
from gateway.guard import AuthFailures, BodyGuard
from gateway.routes import (
    admin,
    dashboard,
    export,
    files,
    futures,
    hf_files,
    metrics,
    native,
    native_model,
    native_processor,
    openai_compat,
    rest,
    sampling,
    service,
    training,
    twinkle,
)
from gateway.telemetry import Telemetry
from server import boot
from server.config import bind_problem, settings_from_env
from server.logs import setup_logging
from server.runtime import Runtime

API_PREFIX = "/api/v1"
TWINKLE_PREFIX = "/twinkle/v1"  # Twinkle's own extensions
OPENAI_PREFIX = "/v1"  # the OpenAI-compatible API, where OpenAI clients look for it


def create_app(runtime: Runtime, *, freeze_startup_objects: bool = False) -> FastAPI:
    """`freeze_startup_objects`: for a server process of its own (not for apps built in a test
    process, whose frozen objects would never be freed)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await boot.start(runtime)
        if freeze_startup_objects:
            boot.freeze_startup_objects()
        try:
            yield
        finally:
            await app.state.forwarder.close()
            await boot.stop(runtime)

    app = FastAPI(
        title="Twinkle", summary="Tinker-compatible LoRA training server", lifespan=lifespan,
        root_path=runtime.settings.root_path,
    )
    app.state.runtime = runtime
    app.state.forwarder = Forwarder(runtime.instances.id)
    errors.install(app)
    settings = runtime.settings
    if problem := bind_problem(settings):  # uvicorn may bind elsewhere still: BodyGuard checks each caller
        raise ValueError(problem)
    app.state.auth_failures = AuthFailures(settings.auth_failures_per_minute)
    app.add_middleware(BodyGuard, default_limit=settings.max_request_mb << 20, open_mode=settings.auth == "open")
    app.add_middleware(Telemetry, metrics=runtime.metrics, tracing=runtime.tracing)  # outermost: sees BodyGuard's refusals
    for router in (service.router, training.router, sampling.router, futures.router, rest.router):
        app.include_router(router, prefix=API_PREFIX)
    app.include_router(admin.router)
    app.include_router(metrics.router)  # GET /metrics (Prometheus)
    app.include_router(twinkle.router, prefix=TWINKLE_PREFIX)
    app.include_router(dashboard.router, prefix=TWINKLE_PREFIX + "/dashboard")
    app.include_router(dashboard.page)
    app.include_router(export.router, prefix=TWINKLE_PREFIX)
    app.include_router(native.router, prefix=API_PREFIX)
    app.include_router(openai_compat.router, prefix=API_PREFIX)  # the native API's OpenAI bridge
    app.include_router(files.router, prefix=API_PREFIX)  # where the native API's datasets come from
    app.include_router(openai_compat.router, prefix=OPENAI_PREFIX)
    app.include_router(files.router, prefix=OPENAI_PREFIX)
    app.include_router(openai_compat.unknown, prefix=OPENAI_PREFIX)
    app.include_router(native_model.router, prefix=API_PREFIX)  # the native Twinkle API (twinkle_client)
    app.include_router(native_processor.router, prefix=API_PREFIX)  # its processor app (server-side data)
    app.include_router(hf_files.router, prefix="/hf")  # tokenizer files for HF_ENDPOINT=<server>/hf (open)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory (`twinkle serve` names it as a string, so nothing imports the gateway)."""
    settings = settings_from_env()
    setup_logging(settings.log_level)
    return create_app(boot.build_runtime(settings), freeze_startup_objects=True)
