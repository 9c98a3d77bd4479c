"""One spelling for the client API of every tinker SDK the suite runs against (0.16.1, 0.24.1,
0.38.0; see `--sdk` in tests/conftest.py). Only the client API differs here; the wire
differences are the server's business.

* 0.38's create-methods return a future of the client; older ones return the client: `resolve`.
* `ServiceClient.close()` and the context manager are 0.30+: `service()` closes on every version
  (old SDKs' sessions simply stop heartbeating).
* There is no top-level `tinker.RestClient` before 0.31: `rest_client()`.
* Old `SamplingClient.sample()` returns a `concurrent.futures.Future`, not an awaitable:
  `sample_async()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import tinker
from tinker import types

SDK: tuple[int, int, int] = tuple(int(part) for part in tinker.__version__.split(".")[:3])  # type: ignore[assignment]
VERSION: str = tinker.__version__


def resolve(value: Any) -> Any:
    """The client a create-method produced: 0.38 returns a future of it (which also passes for the
    client, with a deprecation warning), older SDKs the client."""
    return value.result() if callable(getattr(type(value), "result", None)) else value


def close(sc: tinker.ServiceClient) -> None:
    """Finish the session where the SDK can (0.30+: POST /sessions/{id}/finish). Bounded, so that a
    close that never returns fails its test in a minute, with this line in the traceback."""
    if hasattr(sc, "close"):
        sc.close("success").result(timeout=60)


@contextmanager
def service(server: Any, key: str, **kwargs: Any) -> Iterator[tinker.ServiceClient]:
    """A ServiceClient on the test server, closed when the block ends, on every SDK version."""
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=key, **kwargs)
    try:
        yield sc
    finally:
        close(sc)


def rest_client(server: Any, key: str, sc: tinker.ServiceClient | None = None) -> Any:
    """A RestClient: top-level `tinker.RestClient` where the SDK has it, else `sc.create_rest_client()`."""
    if hasattr(tinker, "RestClient"):
        return tinker.RestClient(base_url=server.base_url, api_key=key)
    if sc is None:
        raise ValueError(f"tinker {VERSION} makes RestClients only from a ServiceClient: pass sc")
    return sc.create_rest_client()


async def sample_async(sampler: tinker.SamplingClient, *args: Any, **kwargs: Any) -> types.SampleResponse:
    """`await sampler.sample(...)` on every version: 0.38 returns an awaitable future, older SDKs a
    `concurrent.futures.Future`."""
    pending = sampler.sample(*args, **kwargs)
    if hasattr(pending, "__await__"):
        return await pending
    return await asyncio.wrap_future(pending)
