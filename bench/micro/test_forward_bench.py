"""Forwarding layer alone: a PeerClient call answered by a PeerServer over a Unix socket.

Client and server share one event loop here, so wall time per call is the CPU both
sides of a forwarding hop cost together (frame encode/decode, socket I/O, futures).
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest
import uvloop

from silo.runtime.forward import PeerClient, PeerServer, new_secret

BATCH = 2000
IN_FLIGHT = 64


@pytest.mark.microbench
def test_forwarded_call_round_trip(benchmark):
    payload = b"x" * 200

    async def echo(method: str, data: bytes, meta):
        return 0, "", (), data

    loop = uvloop.new_event_loop()
    d = tempfile.mkdtemp(prefix="silo-fwd-")
    path = os.path.join(d, "w.sock")
    secret = new_secret()
    server = PeerServer(path, echo, secret)
    loop.run_until_complete(server.start())
    client = PeerClient(path, "w0", secret)

    async def batch():
        sem = asyncio.Semaphore(IN_FLIGHT)

        async def one():
            async with sem:
                assert await client.call("GetJob", payload) == payload

        await asyncio.gather(*(one() for _ in range(BATCH)))

    loop.run_until_complete(batch())  # connect and warm up
    benchmark.pedantic(lambda: loop.run_until_complete(batch()), rounds=5, iterations=1)
    benchmark.extra_info["us_per_call_both_sides"] = benchmark.stats.stats.mean / BATCH * 1e6
    loop.run_until_complete(client.close())
    loop.run_until_complete(server.close())
    loop.close()
