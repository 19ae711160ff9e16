"""The gRPC server: settings real Silo clients need, health and reflection services."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from silo._proto import silo_pb2
from silo.errors import SiloError
from silo.rpc import stream
from silo.rpc.admission import Admission
from silo.rpc.service import SiloService

SERVICE_NAME = silo_pb2.DESCRIPTOR.services_by_name["Silo"].full_name


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel arguments: large messages, and tolerance of clients' 5 s idle pings."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Silo clients ping every 5 s even with no call in flight; grpcio's defaults
        # answer that with GOAWAY too_many_pings after ~20 s.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def reply_serializer(response_type: type) -> Callable[[object], bytes]:
    """grpcio's response serializer for a Silo method: a message is encoded; bytes (a
    reply relayed from the shard's owner process, already encoded there) go out as they
    are, saving a parse and an encode per forwarded call."""
    encode = response_type.SerializeToString

    def serialize(reply: object) -> bytes:
        return reply if reply.__class__ is bytes else encode(reply)

    return serialize


def _behind_admission(name: str, fn, service: SiloService, admission: Admission):
    """A raw-bytes handler that checks the token, then the process's byte budget, and only
    then hands the undecoded body to the service's `rpc` wrapper (see silo.rpc.admission)."""

    async def serve(raw: bytes, context: grpc.aio.ServicerContext):
        n = len(raw)
        try:
            if service.auth_token:
                service.check_auth(context)  # an unauthenticated caller learns nothing more
            admission.check(name, n)
        except SiloError as e:
            del raw
            await context.abort(e.code, e.message)
        try:
            return await fn(raw, context)
        finally:
            admission.release(n)

    return serve


def add_silo_service(service: SiloService, server: grpc.aio.Server,
                     admission: Admission | None = None) -> None:
    """Register silo.v1.Silo. Handlers made by the service's `rpc` wrapper take the raw
    request bytes and parse them after the auth check (an undecodable body is then
    INVALID_ARGUMENT, not an UNKNOWN with a traceback per call) and, with `admission`,
    after the byte budget; any other handler gets the parsed message as grpcio's generated
    code would give it."""
    handlers = {}
    for m in silo_pb2.DESCRIPTOR.services_by_name["Silo"].methods:
        fn = getattr(service, m.name)
        request_type = getattr(silo_pb2, m.input_type.name)
        response_type = getattr(silo_pb2, m.output_type.name)
        raw = getattr(fn, "raw_request", False)
        if raw and admission is not None and not m.server_streaming:
            fn = _behind_admission(m.name, fn, service, admission)
        make = (grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(
            fn,
            request_deserializer=None if raw else request_type.FromString,
            response_serializer=reply_serializer(response_type))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def build_server(service: SiloService, max_message_bytes: int,
                 admission: Admission | None = None) -> grpc.aio.Server:
    server = grpc.aio.server(options=server_options(max_message_bytes))
    add_silo_service(service, server, admission)
    stream.add_stream_service(stream.SiloStreamService(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, stream.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    server.health_servicer = health_servicer  # type: ignore[attr-defined]
    return server


async def mark_serving(server: grpc.aio.Server) -> None:
    hs = server.health_servicer  # type: ignore[attr-defined]
    await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)


def watch_storage(server: grpc.aio.Server, committers: list,
                  admission: Admission | None = None, *, publish: bool = True) -> None:
    """Health answers NOT_SERVING while any shard's storage is stalled (a write past
    its bound: full disk, unreachable object store), SERVING again once all recover;
    meanwhile `admission` refuses writing calls before they stage anything.

    `committers` are the shards' GroupCommitters; their `on_stall` hooks are set here.
    With publish=False only `admission` is told: whoever follows the node's health
    (silo.runtime.health) reads `admission.storage_stalled` and publishes it."""
    hs = server.health_servicer  # type: ignore[attr-defined]
    stalled: set[int] = set()
    tasks: set[asyncio.Task[None]] = set()

    def changed(key: int, is_stalled: bool) -> None:
        before = bool(stalled)
        if is_stalled:
            stalled.add(key)
        else:
            stalled.discard(key)
        if bool(stalled) == before:
            return
        if admission is not None:
            admission.storage_stalled = bool(stalled)
        if not publish:
            return
        status = (health_pb2.HealthCheckResponse.NOT_SERVING if stalled
                  else health_pb2.HealthCheckResponse.SERVING)

        async def set_health() -> None:
            await hs.set(SERVICE_NAME, status)
            await hs.set("", status)

        t = asyncio.ensure_future(set_health())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    for c in committers:
        c.on_stall = functools.partial(changed, id(c))
