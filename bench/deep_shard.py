#!/usr/bin/env python3
"""One shard without gRPC: RSS growth, open-to-first-lease and lease latency at depth.

    python bench/deep_shard.py [--jobs 300000] [--buffer 4096]

Opens a shard on a temp file store in this process, enqueues 1,000 jobs (reference),
times 200 lease_tasks(max_tasks=1), enqueues up to --jobs, reads VmRSS, times 200
leases again, closes the shard and times Shard.open -> first task leased. The shard
part of deep_queue.py's restart (no interpreter start, no gRPC), so it runs in a
minute on a busy box.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import statistics
import tempfile
import time
import uuid

from silo.shard import enqueue, lease, outcome
from silo.shard.state import Shard, ShardConfig


def trim() -> None:
    """Give freed heap back to the OS first (the server does, silo.rpc.memtrim), so RSS
    counts what is held, not what a fill's transient allocations left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def fill(s: Shard, n: int, chunk: int = 500) -> None:
    for i in range(0, n, chunk):
        await asyncio.gather(*(enqueue.enqueue(
            s, tenant="-", job_id="", priority=50, start_at_ms=0, retry_policy=None,
            payload=b"\x81\xa1i\x01", limits=[], metadata={}, task_group="bench")
            for _ in range(min(chunk, n - i))))


async def probe(s: Shard, n: int = 200) -> float:
    """Median of n lease_tasks(max_tasks=1) calls (the lease alone: its durable commit and
    its job info, from the info cache or storage); each task is then reported, untimed."""
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        [lt] = await lease.lease_tasks(s, "w", 1, "bench")
        lat.append((time.perf_counter() - t) * 1000)
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
    return statistics.median(lat)


async def main(a: argparse.Namespace) -> None:
    url = f"file://{tempfile.mkdtemp(prefix='silo-deep-shard-')}"
    sid = str(uuid.uuid4())
    # flush_on_commit as the server has it by default: a lease then waits for its own WAL
    # flush, not for the next 10 ms flush tick, so the job-info read shows in its latency.
    cfg = ShardConfig(ready_buffer_size=a.buffer, write_timeout_ms=600_000, flush_on_commit=True)
    s = await Shard.open(sid, "", "", url, cfg)
    await fill(s, 1000)
    p50_ref = await probe(s)
    trim()
    rss_ref = rss_mb()
    t = time.perf_counter()
    await fill(s, a.jobs - 800)
    fill_s = time.perf_counter() - t
    p50_deep = await probe(s)
    trim()
    rss_deep = rss_mb()
    await s.close()
    t = time.perf_counter()
    s = await Shard.open(sid, "", "", url, cfg)
    opened = time.perf_counter() - t
    got = await lease.lease_tasks(s, "w", 1, "bench")
    first = time.perf_counter() - t
    assert got
    p50_after = await probe(s)
    await s.close()
    print(f"{a.jobs:,} queued (filled in {fill_s:.0f} s); buffer {a.buffer}")
    print(f"RSS (after malloc_trim) at 1,000 {rss_ref:.0f} MB, at depth {rss_deep:.0f} MB: +{rss_deep - rss_ref:.0f} MB")
    print(f"open {opened * 1000:.0f} ms, open -> first task leased {first * 1000:.0f} ms")
    print(f"lease p50 {p50_ref:.2f} ms at 1,000, {p50_deep:.2f} ms at depth "
          f"(x{p50_deep / p50_ref:.2f}), {p50_after:.2f} ms after reopening")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=300_000)
    ap.add_argument("--buffer", type=int, default=4096)
    asyncio.run(main(ap.parse_args()))
