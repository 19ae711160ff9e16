"""Per-RPC instrumentation: the gRPC request counter and latency histogram, and (when
tracing is on) the SERVER span whose parent is the caller's `traceparent`.

Wraps the handlers built by silo.rpc.service's `rpc` decorator; forwarded calls enter
below this wrapper (through `.inner`), so a call is counted once, by the process the
client talked to.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time

from silo.observability import metrics, tracing


def _status_name(context, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code() if context is not None else None
    except Exception:  # noqa: BLE001 - older grpcio without ServicerContext.code()
        code = None
    name = getattr(code, "name", None)
    return name or "UNKNOWN"


def instrument_rpc(name: str, handler):
    if inspect.isasyncgenfunction(handler):
        return handler  # streaming handlers are instrumented where they are written
    requests, duration = metrics.GRPC_REQUESTS, metrics.GRPC_DURATION
    ok, by_method = (name, "OK"), (name,)
    perf = time.perf_counter

    @functools.wraps(handler)
    async def metered(self, request, context):
        t0 = perf()
        try:
            out = await handler(self, request, context)
        except BaseException as e:
            requests.inc((name, _status_name(context, e)))
            duration.observe(by_method, perf() - t0)
            raise
        requests.inc(ok)
        duration.observe(by_method, perf() - t0)
        return out

    if not tracing.ENABLED:
        wrapped = metered
    else:
        span_name = f"silo.v1.Silo/{name}"

        @functools.wraps(handler)
        async def wrapped(self, request, context):
            with tracing.server_span(span_name, tracing.extract_grpc(context)):
                return await metered(self, request, context)

    wrapped.inner = getattr(handler, "inner", handler)  # type: ignore[attr-defined]
    return wrapped
