"""OpenTelemetry traces, only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

`ENABLED` is decided once, from the environment at import (the supervisor imports every
module before it forks, so all processes agree). When it is false nothing here touches
OpenTelemetry: `traced` returns the function itself, and callers test `ENABLED` before
any other call, so tracing off costs nothing at all on the hot path.

When on, each worker exports OTLP/HTTP (protobuf) spans with `service.name = silo`
through a batch processor (its thread starts in the worker, after the fork). Spans:
one SERVER span per RPC (`silo.v1.Silo/<Method>`) whose parent is the caller's W3C
`traceparent`/`tracestate` metadata; `enqueue`, `dequeue` (the lease of tasks),
`report_outcome`, `concurrency.grant`, `concurrency.release`, `storage.commit`, and
`forward` for the hop to the worker process owning a shard — the hop carries the
context to the owner, whose spans continue the same trace.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

ENABLED = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
               or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))

F = TypeVar("F", bound=Callable[..., Any])

_SEP = "|"  # forwarded method names carry the context as "<method>|<traceparent>"
_provider: Any = None


def start_worker(index: int) -> None:
    """Install the tracer provider and exporter in this (forked) process."""
    global _provider
    if not ENABLED:
        return
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    resource = Resource.create({"service.name": "silo", "silo.worker": index,
                                "process.pid": os.getpid()})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)


def shutdown() -> None:
    if _provider is not None:
        _provider.shutdown()


def _tracer():
    from opentelemetry import trace  # noqa: PLC0415

    return trace.get_tracer("silo")


def span(name: str, attributes: dict[str, Any] | None = None, **kw):
    """A context manager: a span that is the current one while it is open."""
    return _tracer().start_as_current_span(name, attributes=attributes, **kw)


def traced(name: str, when: Callable[..., bool] | None = None) -> Callable[[F], F]:
    """Decorate a function (sync or async) with a span; identity when tracing is off.
    `when(*args)` false: call it without a span (e.g. a release that frees nothing)."""

    def wrap(fn: F) -> F:
        if not ENABLED:
            return fn
        import inspect  # noqa: PLC0415

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_traced(*a, **kw):
                with span(name):
                    return await fn(*a, **kw)
            return async_traced  # type: ignore[return-value]

        @functools.wraps(fn)
        def sync_traced(*a, **kw):
            if when is not None and not when(*a, **kw):
                return fn(*a, **kw)
            with span(name):
                return fn(*a, **kw)
        return sync_traced  # type: ignore[return-value]

    return wrap


async def awaiting(name: str, fut: Awaitable[Any]) -> Any:
    """Await `fut` inside a span (e.g. a shard's wait for its group commit)."""
    with span(name):
        return await fut


# ---- context propagation --------------------------------------------------------------


def extract_grpc(context) -> Any:
    """The caller's span context from gRPC metadata (`traceparent`, `tracestate`)."""
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    carrier = {}
    if context is not None:
        for k, v in context.invocation_metadata() or ():
            if k in ("traceparent", "tracestate") and isinstance(v, str):
                carrier[k] = v
    return TraceContextTextMapPropagator().extract(carrier) if carrier else None


def inject_method(method: str) -> str:
    """`method` with the current span's traceparent appended, for a forwarded call."""
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    tp = carrier.get("traceparent")
    return f"{method}{_SEP}{tp}" if tp else method


def split_method(method: str) -> tuple[str, Any]:
    """(plain method, parent context) of a forwarded method name."""
    name, _, tp = method.partition(_SEP)
    if not tp:
        return name, None
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    return name, TraceContextTextMapPropagator().extract({"traceparent": tp})


@contextlib.contextmanager
def server_span(name: str, parent: Any):
    from opentelemetry.trace import SpanKind  # noqa: PLC0415

    with _tracer().start_as_current_span(name, context=parent, kind=SpanKind.SERVER) as s:
        yield s
