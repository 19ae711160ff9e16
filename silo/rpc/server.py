"""The gRPC server: settings real Silo clients need, health and reflection services."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from silo._proto import silo_pb2, silo_stream_pb2_grpc
from silo.rpc import stream
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


def add_silo_service(service: SiloService, server: grpc.aio.Server) -> None:
    """Register silo.v1.Silo. Handlers made by the service's `rpc` wrapper take the raw
    request bytes and parse them after the auth check (an undecodable body is then
    INVALID_ARGUMENT, not an UNKNOWN with a traceback per call); any other handler gets
    the parsed message as grpcio's generated code would give it."""
    handlers = {}
    for m in silo_pb2.DESCRIPTOR.services_by_name["Silo"].methods:
        fn = getattr(service, m.name)
        request_type = getattr(silo_pb2, m.input_type.name)
        response_type = getattr(silo_pb2, m.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(
            fn,
            request_deserializer=(None if getattr(fn, "raw_request", False)
                                  else request_type.FromString),
            response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def build_server(service: SiloService, max_message_bytes: int) -> grpc.aio.Server:
    server = grpc.aio.server(options=server_options(max_message_bytes))
    add_silo_service(service, server)
    silo_stream_pb2_grpc.add_SiloStreamServicer_to_server(stream.SiloStreamService(service),
                                                          server)
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
