"""SQL latency on one shard with N jobs in one tenant, and Enqueue latency while a
full-scan statement runs in a loop (in-process: a real Shard on SlateDB's memory store,
the statement through silo.query.engine exactly as the Query RPC runs it, no gRPC).

    .venv/bin/python bench/query.py --jobs 1000,100000,1000000 [--repeat 10] [--json F]

Pre-fill goes through the shard's ImportJobs operation (silo.shard.import_, the body of
the ImportJobs RPC: the same rows, indexes and counters as jobs that ran), in batches
of 1000, several in flight: most jobs imported with one Succeeded attempt, 100 with a
Failed one (no retries left: Failed), min(1000, N/10) with none (Waiting); metadata
user = u<i>, batch = b<i:07>.

Per size: the median and p95 over --repeat runs, and the storage keys each reads, of
* id lookup:       SELECT * FROM jobs WHERE tenant = 'bench' AND id = '<id>'
* status filter:   ... AND status_kind = 'Failed'            (100 rows)
* status + LIMIT:  ... AND status_kind = 'Succeeded' ORDER BY status_changed_at_ms DESC
                   LIMIT 20
* metadata exact:  ... AND array_contains(element_at(metadata, 'user'), 'u42')
* metadata prefix: ... AND starts_with(array_any_value(element_at(metadata, 'batch')),
                   'b000004')                                 (10 rows)
* group by status: SELECT status_kind, COUNT(*) ... GROUP BY status_kind (from the
                   status counters)
Then Enqueue latency (sequential calls on the same shard) in --rounds alternating
rounds: alone, and while `SELECT COUNT(*) FROM jobs WHERE tenant = 'bench' AND
priority >= 0` (a full scan of the tenant, skipped above --full-scan-max jobs) loops.
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

from silo.query import ranges, settings  # noqa: E402
from silo.query.engine import query_shard  # noqa: E402
from silo.shard import enqueue as enq  # noqa: E402
from silo.shard import import_  # noqa: E402
from silo.shard.state import Shard, ShardConfig  # noqa: E402
from silo.storage.records import ATTEMPT_FAILED, ATTEMPT_SUCCEEDED  # noqa: E402

T = "bench"
QUERIES = {
    "id lookup": "SELECT * FROM jobs WHERE tenant = 'bench' AND id = 'j0000042'",
    "status filter": "SELECT id FROM jobs WHERE tenant = 'bench' AND status_kind = 'Failed'",
    "status + LIMIT": "SELECT id FROM jobs WHERE tenant = 'bench' AND status_kind = "
                      "'Succeeded' ORDER BY status_changed_at_ms DESC LIMIT 20",
    "metadata exact": "SELECT id FROM jobs WHERE tenant = 'bench' AND "
                      "array_contains(element_at(metadata, 'user'), 'u42')",
    "metadata prefix": "SELECT id FROM jobs WHERE tenant = 'bench' AND starts_with("
                       "array_any_value(element_at(metadata, 'batch')), 'b000004')",
    "group by status": "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'bench' "
                       "GROUP BY status_kind",
}
FULL_SCAN = "SELECT COUNT(*) FROM jobs WHERE tenant = 'bench' AND priority >= 0"


IMPORT_BATCH = 1000
IMPORTS_IN_FLIGHT = 16
N_FAILED, N_WAITING = 100, 1000


def _job(i: int, n: int, now: int) -> import_.ImportJob:
    if i < N_FAILED:
        attempts = [import_.ImportedAttempt(ATTEMPT_FAILED, now - 2000, now - 1000 + i)]
    elif i < N_FAILED + min(N_WAITING, n // 10):
        attempts = []
    else:  # finished at distinct times, newest last
        attempts = [import_.ImportedAttempt(ATTEMPT_SUCCEEDED, now - 2000, now - 10**7 + i)]
    return import_.ImportJob(f"j{i:07d}", i % 100, now - 3000, 0, None, b"\x81\xa1i\x01",
                             [], {"user": f"u{i}", "batch": f"b{i:07d}"}, "g", attempts)


async def populate(s: Shard, n: int) -> None:
    """n jobs in tenant T through ImportJobs, IMPORTS_IN_FLIGHT batches at a time."""
    now = s.now()
    starts = list(range(0, n, IMPORT_BATCH))
    for w in range(0, len(starts), IMPORTS_IN_FLIGHT):
        wave = starts[w : w + IMPORTS_IN_FLIGHT]
        results = await asyncio.gather(*(
            import_.import_jobs(s, T, [_job(i, n, now) for i in range(a, min(n, a + IMPORT_BATCH))])
            for a in wave))
        bad = [r for rs in results for r in rs if not r.success]
        if bad:
            raise RuntimeError(f"import refused {len(bad)} jobs: {bad[0].error}")


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def enqueue_latencies(s: Shard, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await enq.enqueue(s, tenant="enqueuer", job_id="", priority=50, start_at_ms=0,
                          retry_policy=None, payload=b"\x80", limits=[], metadata={},
                          task_group="e")
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def timed(s: Shard, sql: str, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        with ranges.count_reads() as reads:
            t0 = time.perf_counter()
            await query_shard(s, sql, [])
            times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 2),
            "p95_ms": round(pct(times, 0.95), 2), "keys_read": reads[0]}


async def enqueue_under_scan(s: Shard, enqueues: int, rounds: int) -> dict:
    """Alternate rounds alone / with a full scan looping, so load drift hits both."""
    alone: list[float] = []
    busy: list[float] = []
    scans = 0
    per_round = max(1, enqueues // rounds)
    for _ in range(rounds):
        alone += await enqueue_latencies(s, per_round)
        stop = asyncio.Event()

        async def loop(stop: asyncio.Event) -> None:
            nonlocal scans
            while not stop.is_set():
                await query_shard(s, FULL_SCAN, [])
                scans += 1

        task = asyncio.create_task(loop(stop))
        await asyncio.sleep(0.05)
        busy += await enqueue_latencies(s, per_round)
        stop.set()
        await task
    a50, b50 = pct(alone, 0.5), pct(busy, 0.5)
    a99, b99 = pct(alone, 0.99), pct(busy, 0.99)
    return {"enqueue_p50_ms": round(a50, 2), "enqueue_p99_ms": round(a99, 2),
            "enqueue_p50_ms_during_full_scan": round(b50, 2),
            "enqueue_p99_ms_during_full_scan": round(b99, 2),
            "p50_ratio": round(b50 / a50, 2), "p99_ratio": round(b99 / a99, 2),
            "full_scans_during": scans}


def jobs_in(s: Shard) -> int:
    return sum(c for (t, _), c in s.tenant_status.items() if t == T)


async def bench_size(n: int, repeat: int, enqueues: int, rounds: int, full_scan_max: int,
                     store: str | None) -> dict:
    # --store DIR keeps one pre-filled shard per size (shard "query-bench-N") on local
    # disk: the first run fills it, later runs reopen it and skip the pre-fill.
    url = f"file://{Path(store).resolve()}" if store else "memory:///"
    sid = f"query-bench-{n}" if store else str(uuid.uuid4())
    s = await Shard.open(sid, "", "", url,
                         ShardConfig(flush_interval_ms=10, commit_interval_ms=5.0))
    try:
        t0 = time.perf_counter()
        have = jobs_in(s)
        if have and have < n:
            raise SystemExit(f"{url} shard {sid} holds {have} jobs, not {n}: remove it")
        if not have:
            await populate(s, n)
        out: dict = {"jobs": n, "populate_s": round(time.perf_counter() - t0, 1),
                     "prefilled": bool(have)}
        await asyncio.sleep(1.0)  # let the last memtable flush settle
        for name, sql in QUERIES.items():
            out[name] = await timed(s, sql, repeat)
        if n <= full_scan_max:
            out["full scan"] = await timed(s, FULL_SCAN, 1)
            out.update(await enqueue_under_scan(s, enqueues, rounds))
        return out
    finally:
        await s.close()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="1000,100000")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--enqueues", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--store", default=None,
                    help="keep the pre-filled shards in this directory and reuse them")
    ap.add_argument("--full-scan-max", type=int, default=100_000,
                    help="skip the full-scan scenario above this many jobs")
    args = ap.parse_args()
    # Measure, do not enforce: no statement timeout, no slow-query log lines.
    settings.SETTINGS = settings.QuerySettings(statement_timeout_ms=0, slow_query_log_ms=0)
    results = []
    for n in (int(x) for x in args.jobs.split(",")):
        r = await bench_size(n, args.repeat, args.enqueues, args.rounds, args.full_scan_max,
                             args.store)
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
