"""gRPC health (grpc.health.v1) of one worker, kept in step with the whole node.

Any process of the node can answer a health check (they share the port), so each
reports NOT_SERVING while any process is down, restarting, unresponsive or stopping,
as the supervisor's process table says; SERVING again once every process serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2

from silo.rpc.server import SERVICE_NAME
from silo.runtime.status import ProcessTable

POLL_S = 0.1
ARM_S = 5.0


async def follow_node_health(server: grpc.aio.Server, table: ProcessTable,
                             stalled: Callable[[], bool] = lambda: False) -> None:
    """Run until cancelled: mirror the node's state into this server's health service.

    This worker said SERVING when it started (`mark_serving`); that stands until the
    whole node has been seen serving (or ARM_S passed), so a client checking health
    just after the start line never sees NOT_SERVING while the last READY is on its way
    through the supervisor. From then on the table decides, and `stalled()` (this
    process's storage cannot make writes durable) makes it NOT_SERVING too."""
    hs = server.health_servicer  # type: ignore[attr-defined]
    last = health_pb2.HealthCheckResponse.SERVING
    armed_at = asyncio.get_running_loop().time() + ARM_S
    armed = False
    while True:
        serving = table.all_serving() and not stalled()
        armed = armed or serving or asyncio.get_running_loop().time() >= armed_at
        status = (health_pb2.HealthCheckResponse.SERVING if serving or not armed
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        if status != last:
            await hs.set(SERVICE_NAME, status)
            await hs.set("", status)
            last = status
        await asyncio.sleep(POLL_S)
