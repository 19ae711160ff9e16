"""SQL latency on one shard with N jobs in one tenant, and Enqueue p99 while a full-scan
statement runs in a loop (in-process: a real Shard on SlateDB's memory store, the
statement through silo.query.engine exactly as the Query RPC runs it, without gRPC).

    .venv/bin/python bench/query.py --jobs 1000,100000 [--repeat 20] [--json out.json]

Per size: the median and p95 over --repeat runs of
* id lookup:       SELECT * FROM jobs WHERE tenant = 't' AND id = '<id>'
* status filter:   ... AND status_kind = 'Failed'            (100 failed jobs)
* metadata exact:  ... AND array_contains(element_at(metadata, 'user'), 'u42')
* metadata prefix: ... AND starts_with(array_any_value(element_at(metadata, 'batch')),
                   'b000004')                                 (10 jobs)
* group by status: SELECT status_kind, COUNT(*) ... GROUP BY status_kind (reads every
                   status row of the tenant: grows with N by nature)
Then Enqueue latency (sequential, --enqueues calls) alone and while
`SELECT COUNT(*) FROM jobs WHERE tenant = 't' AND priority >= 0` (a full scan) loops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from silo.query import settings  # noqa: E402
from silo.query.engine import query_shard  # noqa: E402
from silo.shard import enqueue as enq  # noqa: E402
from silo.shard import lease, outcome  # noqa: E402
from silo.shard.state import Shard, ShardConfig  # noqa: E402
from silo.storage.records import JobInfo  # noqa: E402

T = "bench"
QUERIES = {
    "id lookup": "SELECT * FROM jobs WHERE tenant = 'bench' AND id = 'j0000042'",
    "status filter": "SELECT id FROM jobs WHERE tenant = 'bench' AND status_kind = 'Failed'",
    "metadata exact": "SELECT id FROM jobs WHERE tenant = 'bench' AND "
                      "array_contains(element_at(metadata, 'user'), 'u42')",
    "metadata prefix": "SELECT id FROM jobs WHERE tenant = 'bench' AND starts_with("
                       "array_any_value(element_at(metadata, 'batch')), 'b000004')",
    "group by status": "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'bench' "
                       "GROUP BY status_kind",
}
FULL_SCAN = "SELECT COUNT(*) FROM jobs WHERE tenant = 'bench' AND priority >= 0"


async def populate(s: Shard, n: int) -> None:
    now = s.now()
    for i in range(n):
        group = "fail" if i < 100 else "g"
        enq._stage(s, JobInfo(f"j{i:07d}", T, i % 100, now, b"\x81\xa1i\x01", None,
                              {"user": f"u{i}", "batch": f"b{i:07d}"}, [], group))
        if i % 2000 == 1999:
            await s.committer.commit()
    await s.committer.commit()
    for lt in await lease.lease_tasks(s, "w", 100, "fail"):
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def enqueue_latencies(s: Shard, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await enq.enqueue(s, tenant=T, job_id="", priority=50, start_at_ms=0,
                          retry_policy=None, payload=b"\x80", limits=[], metadata={},
                          task_group="e")
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def bench_size(n: int, repeat: int, enqueues: int) -> dict:
    s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                         ShardConfig(flush_interval_ms=10, commit_interval_ms=5.0))
    try:
        t0 = time.perf_counter()
        await populate(s, n)
        out: dict = {"jobs": n, "populate_s": round(time.perf_counter() - t0, 1)}
        for name, sql in QUERIES.items():
            times = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                await query_shard(s, sql, [])
                times.append((time.perf_counter() - t0) * 1000)
            out[name] = {"median_ms": round(statistics.median(times), 2),
                         "p95_ms": round(pct(times, 0.95), 2)}
        alone = await enqueue_latencies(s, enqueues)
        stop = False
        scans = 0

        async def loop() -> None:
            nonlocal scans
            while not stop:
                await query_shard(s, FULL_SCAN, [])
                scans += 1

        task = asyncio.create_task(loop())
        await asyncio.sleep(0.05)
        busy = await enqueue_latencies(s, enqueues)
        stop = True
        await task
        out["enqueue_p50_ms"] = round(pct(alone, 0.5), 2)
        out["enqueue_p99_ms"] = round(pct(alone, 0.99), 2)
        out["enqueue_p50_ms_during_full_scan"] = round(pct(busy, 0.5), 2)
        out["enqueue_p99_ms_during_full_scan"] = round(pct(busy, 0.99), 2)
        out["full_scans_during"] = scans
        return out
    finally:
        await s.close()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="1000,100000")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--enqueues", type=int, default=500)
    args = ap.parse_args()
    # Measure, do not enforce: no statement timeout, no slow-query log lines.
    settings.SETTINGS = settings.QuerySettings(statement_timeout_ms=0, slow_query_log_ms=0)
    results = []
    for n in (int(x) for x in args.jobs.split(",")):
        r = await bench_size(n, args.repeat, args.enqueues)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
