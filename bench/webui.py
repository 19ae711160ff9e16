#!/usr/bin/env python3
"""Web UI page latency with many jobs on the node.

    .venv/bin/python bench/webui.py [--jobs 100000] [--rounds 50]

Starts its own `silo serve` (temp data dir, ports 0, 2 worker processes), enqueues
--jobs jobs over gRPC (one asyncio client, many calls in flight, spread over the shards
by tenant-less random shard choice), then fetches each page --rounds times one after the
other and prints p50/p90/max in ms. The pages read counters and point lookups only, so
their cost should not grow with the job count.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc

LINE = re.compile(r"silo serving on (\S+) .* webui=http://(\S+)")


async def fill(addr: str, n: int, inflight: int = 256) -> list[tuple[str, str]]:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.SiloStub(ch)
        shards = [o.shard_id for o in (await stub.GetClusterInfo(
            pb.GetClusterInfoRequest())).shard_owners]
        ids: list[tuple[str, str]] = []
        left = n

        async def one() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                shard = random.choice(shards)
                r = await stub.Enqueue(pb.EnqueueRequest(
                    shard=shard, task_group="bench", priority=50,
                    payload=pb.SerializedBytes(msgpack=b"\x81\xa1n\x01"),
                    metadata={"k": "v"}))
                if len(ids) < 1000:
                    ids.append((shard, r.id))

        await asyncio.gather(*(one() for _ in range(inflight)))
        return ids


def timed(url: str, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
            assert r.status == 200, url
        out.append((time.perf_counter() - t0) * 1000)
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.Popen(
            [sys.executable, "-m", "silo", "serve", "--data-dir", d, "--grpc-addr",
             "127.0.0.1:0", "--webui-addr", "127.0.0.1:0", "--processes", "2"],
            stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                m = LINE.search(line)
                if m:
                    break
            else:
                raise SystemExit("server did not start")
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            addr, web = m.group(1), m.group(2)
            t0 = time.perf_counter()
            ids = asyncio.run(fill(addr, args.jobs))
            took = time.perf_counter() - t0
            print(f"enqueued {args.jobs} jobs in {took:.1f} s ({args.jobs / took:.0f}/s)")
            shard, job = ids[len(ids) // 2]
            pages = {
                "overview /": "/",
                "shard": f"/shard?id={shard}",
                "job (shard given)": f"/job?id={job}&shard={shard}",
                "job (shard searched)": f"/job?id={job}",
                "config": "/config",
            }
            for name, path in pages.items():
                ms = timed(f"http://{web}{path}", args.rounds)
                print(f"{name:22s} p50 {ms[len(ms) // 2]:6.1f} ms  p90 "
                      f"{ms[int(len(ms) * 0.9)]:6.1f} ms  max {ms[-1]:6.1f} ms")
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
