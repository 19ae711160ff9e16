#!/usr/bin/env python3
"""CPU and wall time of durable group commits in isolation: one shard's GroupCommitter
over SlateDB on a local file store, no gRPC, no state machine.

    PYTHONPATH=. .venv/bin/python bench/commit_cost.py [--commits 2000] [--keys 1]
        [--flush-on-commit 1] [--flush-interval-ms 10] [--concurrency 1] [--wake 1]

Each commit stages --keys 200-byte puts and awaits their durability; --concurrency
operations run at once (they share batches as in the server). CPU is the whole
process's (getrusage: the Python thread and SlateDB's Tokio threads), then per thread
name with its context switches (/proc). --wake 1 (the default) delivers SlateDB
completions through silo.storage.wake, as the server does; SILO_SLATEDB_SCHED_BATCH=1
puts SlateDB's threads under SCHED_BATCH (silo.storage.sched, storage.slatedb_sched_batch
in the server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import tempfile
import time


def _usage() -> tuple[float, int]:
    """(CPU seconds, voluntary context switches) of the whole process, all threads: a
    thread that blocks (futex, epoll, eventfd) switches voluntarily, so the second counts
    the thread hops, whatever the load (preemptions by other processes are not in it)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _per_thread() -> dict[str, list[float]]:
    """Thread name -> [CPU seconds, voluntary, involuntary context switches], summed over
    the threads of that name (SlateDB's Tokio workers and blocking threads share one)."""
    out: dict[str, list[float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        row = out.setdefault(name, [0.0, 0, 0])
        row[0] += (int(fields[11]) + int(fields[12])) / tick
        row[1] += int(status["voluntary_ctxt_switches"])
        row[2] += int(status["nonvoluntary_ctxt_switches"])
    return out


def _thread_delta(before: dict[str, list[float]], after: dict[str, list[float]],
                  n: int) -> str:
    """Per thread name: CPU us / voluntary / involuntary switches per batch (threads that
    ended meanwhile are missing from `after`; their share is in the process totals)."""
    parts = []
    for name, row in sorted(after.items()):
        b = before.get(name, [0.0, 0, 0])
        parts.append(f"{name} {(row[0] - b[0]) / n * 1e6:,.0f} us {(row[1] - b[1]) / n:.2f}v "
                     f"{(row[2] - b[2]) / n:.2f}i")
    return "; ".join(parts)


async def run(a: argparse.Namespace) -> None:
    from silo.storage import sched
    from silo.storage.database import open_database
    from silo.storage.db import GroupCommitter
    from silo.storage.slatedb_settings import StorageTuning, slatedb_settings

    sched.configure(os.environ.get("SILO_SLATEDB_SCHED_BATCH", "0") == "1")
    if a.wake:
        from silo.storage import wake

        wake.install()
    d = tempfile.mkdtemp(prefix="silo-commit-cost-")
    try:
        db = await open_database(f"file://{d}", "s", flush_interval_ms=a.flush_interval_ms,
                                 l0_sst_size_bytes=64 << 20,
                                 # room for that memtable: SlateDB requires more unflushed
                                 # bytes than one L0 SST (the server default is 32 MiB)
                                 extra_settings=slatedb_settings(
                                     StorageTuning(max_unflushed_bytes=128 << 20)),
                                 flush_on_commit=bool(a.flush_on_commit))
        gc = GroupCommitter(db, commit_interval_s=0)
        gc.flush_on_commit = bool(a.flush_on_commit)
        value = os.urandom(200)
        n = 0

        async def op() -> None:
            nonlocal n
            for _ in range(a.keys):
                n += 1
                gc.put(b"k%012d" % n, value)
            await gc.commit()

        async def worker(count: int) -> None:
            for _ in range(count):
                await op()

        await worker(50)  # warm-up
        b0, t0, p0 = gc.batches_written, time.perf_counter(), time.thread_time()
        c0, s0 = _usage()
        th0 = _per_thread()
        per = a.commits // a.concurrency
        await asyncio.gather(*(worker(per) for _ in range(a.concurrency)))
        (c1, s1), t1, p1 = _usage(), time.perf_counter(), time.thread_time()
        th1 = _per_thread()
        ops, batches = per * a.concurrency, gc.batches_written - b0
        print(f"flush_on_commit={a.flush_on_commit} flush_interval={a.flush_interval_ms} ms "
              f"keys/op={a.keys} concurrency={a.concurrency} wake={a.wake}: {ops / (t1 - t0):,.0f} ops/s, "
              f"{batches} batches; per op {(t1 - t0) / ops * 1e6:,.0f} us wall, "
              f"{(c1 - c0) / ops * 1e6:,.0f} us CPU; per batch "
              f"{(c1 - c0) / max(batches, 1) * 1e6:,.0f} us CPU "
              f"({(p1 - p0) / max(batches, 1) * 1e6:,.0f} in the event loop's thread), "
              f"{(s1 - s0) / max(batches, 1):.1f} voluntary context switches; {_threads()} threads"
              f"; late flushes {getattr(getattr(gc, '_calls', None), 'late_flushes', '-')}")
        print(f"  per batch by thread (CPU, voluntary/involuntary switches): "
              f"{_thread_delta(th0, th1, max(batches, 1))}")
        await gc.close()
        await db.shutdown()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--keys", type=int, default=1, help="puts per operation")
    ap.add_argument("--flush-on-commit", type=int, default=1)
    ap.add_argument("--flush-interval-ms", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--wake", type=int, default=1,
                    help="1: completions through silo.storage.wake (as the server)")
    ap.add_argument("--pin", type=int, default=1,
                    help="1: run on one CPU, as a server worker does (silo.runtime.supervisor)")
    import uvloop

    a = ap.parse_args()
    if a.pin:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    uvloop.run(run(a))


if __name__ == "__main__":
    main()
