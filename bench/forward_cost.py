#!/usr/bin/env python3
"""Both sides of a forwarding hop in one process: PeerClient calls answered by a
PeerServer over a Unix socket, `--in-flight` at once, with the real frame layout.

    PYTHONPATH=. .venv/bin/python bench/forward_cost.py [--calls 20000] [--in-flight 64]

CPU per call here is frame encode/decode, socket I/O and futures of both processes
together, without grpcio and without the handler. For a count a busy box does not
change, run it under callgrind twice and subtract (start-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/f.out \\
        .venv/bin/python bench/forward_cost.py --calls 4000      # and --calls 1000
    # (Ir(4000) - Ir(1000)) / 3000 = instructions per forwarded call, both sides
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from silo.runtime.forward import PeerClient, PeerServer, new_secret  # noqa: E402


async def run(calls: int, in_flight: int, payload_bytes: int) -> dict[str, float]:
    payload = b"x" * payload_bytes

    async def echo(method: str, data: bytes, meta):
        return 0, "", (), data

    d = tempfile.mkdtemp(prefix="silo-fwd-")
    path = os.path.join(d, "w.sock")
    secret = new_secret()
    server = PeerServer(path, echo, secret)
    await server.start()
    client = PeerClient(path, "w0", secret)

    async def batch(n: int) -> None:
        async def loop(k: int) -> None:  # one of `in_flight` callers, k calls in a row
            for _ in range(k):
                if await client.call("GetJob", payload) != payload:
                    raise AssertionError("wrong reply")

        each, extra = divmod(n, in_flight)
        await asyncio.gather(*(loop(each + (i < extra)) for i in range(in_flight)))

    await batch(in_flight * 4)  # connect and warm up
    p0, w0 = time.process_time(), time.perf_counter()
    await batch(calls)
    p1, w1 = time.process_time(), time.perf_counter()
    await client.close()
    await server.close()
    return {"cpu_us_per_call": (p1 - p0) / calls * 1e6, "wall_us_per_call": (w1 - w0) / calls * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--payload", type=int, default=200, help="request/reply bytes")
    a = ap.parse_args(argv)
    try:
        import uvloop
        r = uvloop.run(run(a.calls, a.in_flight, a.payload))
    except ImportError:
        r = asyncio.run(run(a.calls, a.in_flight, a.payload))
    print(f"forwarded call, both sides: cpu {r['cpu_us_per_call']:.1f} µs/call  "
          f"wall {r['wall_us_per_call']:.1f} µs/call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
