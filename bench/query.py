"""SQL latency on one shard with N jobs in one tenant, and Enqueue latency while a
full-scan statement runs in a loop (in-process: the tenant's shard of a server data dir,
opened as `silo serve` opens it, statements through silo.query.engine exactly as the
Query RPC runs them, no gRPC).

    .venv/bin/python bench/query.py --jobs 1000,100000,1000000 [--data-dir DIR] [--json F]

Data: per size N a data dir `DIR/jobs-N` filled by bench/fill.py (the shard's ImportJobs
path, the same rows, indexes and counters as jobs that ran) when it is not there yet,
reused when it is (without --data-dir: a temporary dir, removed afterwards). Tenant
`bench` (tenancy on, 8 shards, as the bench servers): jobs j0000000-j0000099 Failed,
then 95 % Succeeded and 5 % Waiting; metadata user = u<i>, batch = b<i:07>, customer =
c<i % (N/1000)>. Every indexed statement matches the same number of rows at every N,
as a lookup benchmark must (only the haystack grows):

* id lookup:       SELECT * FROM jobs WHERE tenant = 'bench' AND id = 'j0000042'  (1 row)
* status filter:   ... AND status_kind = 'Failed'                              (100 rows)
* status + LIMIT:  ... AND status_kind = 'Succeeded' ORDER BY status_changed_at_ms DESC
                   LIMIT 20                                                      (20 rows)
* metadata exact:  ... AND array_contains(element_at(metadata, 'user'), 'u42')   (1 row)
* metadata shared: ... AND array_contains(element_at(metadata, 'customer'), 'c0')
                                                                              (1,000 rows)
* metadata prefix: ... AND starts_with(array_any_value(element_at(metadata, 'batch')),
                   'b000004')                                                   (10 rows)
* group by status: SELECT status_kind, COUNT(*) ... GROUP BY status_kind (one row per
                   status counter, silo.query.counted)

Per size: the median and p95 over --repeat runs, and the storage keys each reads. Then
Enqueue latency (sequential calls on the same shard, another tenant) in --rounds
alternating rounds: alone, and while `SELECT COUNT(*) FROM jobs WHERE tenant = 'bench'
AND priority >= 0` (a full scan of the tenant) loops; the scan in flight at the end of
a round is cancelled, so the scenario runs at any N. The Enqueue jobs are imported into
the data dir too (a reused dir gains them; the counts above are checked per tenant).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fill  # noqa: E402  (bench/fill.py)

from silo.query import ranges, settings  # noqa: E402
from silo.query.engine import query_shard  # noqa: E402
from silo.shard import enqueue as enq  # noqa: E402
from silo.shard.state import Shard  # noqa: E402
from silo.storage.database import METRICS_RECORDERS  # noqa: E402

T = "bench"
QUERIES = {
    "id lookup": "SELECT * FROM jobs WHERE tenant = 'bench' AND id = 'j0000042'",
    "status filter": "SELECT id FROM jobs WHERE tenant = 'bench' AND status_kind = 'Failed'",
    "status + LIMIT": "SELECT id FROM jobs WHERE tenant = 'bench' AND status_kind = "
                      "'Succeeded' ORDER BY status_changed_at_ms DESC LIMIT 20",
    "metadata exact": "SELECT id FROM jobs WHERE tenant = 'bench' AND "
                      "array_contains(element_at(metadata, 'user'), 'u42')",
    "metadata shared": "SELECT id FROM jobs WHERE tenant = 'bench' AND "
                       "array_contains(element_at(metadata, 'customer'), 'c0')",
    "metadata prefix": "SELECT id FROM jobs WHERE tenant = 'bench' AND starts_with("
                       "array_any_value(element_at(metadata, 'batch')), 'b000004')",
    "group by status": "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'bench' "
                       "GROUP BY status_kind",
}
FULL_SCAN = "SELECT COUNT(*) FROM jobs WHERE tenant = 'bench' AND priority >= 0"


N_FAILED = 100
MIX = [950, 0, 0, 50, 0]  # Succeeded, Failed, Cancelled, Waiting, Scheduled (per mille)
SHARDS = 8


def prefill(data_dir: Path, n: int) -> dict:
    """The bench's data in data_dir (fill.py: ImportJobs in durable chunks)."""
    return asyncio.run(fill.fill(data_dir, n, tenant=T, tenancy=True, shards=SHARDS,
                                 mix=MIX, first=(("Failed", N_FAILED),), progress=True))


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def enqueue_latencies(s: Shard, tenant: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await enq.enqueue(s, tenant=tenant, job_id="", priority=50, start_at_ms=0,
                          retry_policy=None, payload=b"\x80", limits=[], metadata={},
                          task_group="e")
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def timed_once(s: Shard, sql: str) -> tuple[float, float, int]:
    """(wall ms, process CPU ms, keys read) of one statement. CPU is every thread of the
    process (DataFusion's, SlateDB's), so it means something on a loaded box too."""
    with ranges.count_reads() as reads:
        c0, t0 = time.process_time(), time.perf_counter()
        await query_shard(s, sql, [])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall * 1000, cpu * 1000, reads[0]


def summary(samples: list[tuple[float, float, int]]) -> dict:
    walls = [w for w, _, _ in samples]
    cpus = [c for _, c, _ in samples]
    return {"median_ms": round(statistics.median(walls), 2), "p95_ms": round(pct(walls, 0.95), 2),
            "cpu_median_ms": round(statistics.median(cpus), 2), "keys_read": samples[-1][2]}


async def enqueue_under_scan(s: Shard, tenant: str, enqueues: int, rounds: int) -> dict:
    """Alternate rounds alone / with a full scan looping, so load drift hits both."""
    alone: list[float] = []
    busy: list[float] = []
    scans = 0
    per_round = max(1, enqueues // rounds)
    for _ in range(rounds):
        alone += await enqueue_latencies(s, tenant, per_round)
        stop = asyncio.Event()

        async def loop(stop: asyncio.Event) -> None:
            nonlocal scans
            while not stop.is_set():
                await query_shard(s, FULL_SCAN, [])
                scans += 1

        task = asyncio.create_task(loop(stop))
        await asyncio.sleep(0.05)
        busy += await enqueue_latencies(s, tenant, per_round)
        stop.set()
        task.cancel()  # the scan in flight (minutes at 1M jobs) is not waited for
        with contextlib.suppress(asyncio.CancelledError):
            await task
    a50, b50 = pct(alone, 0.5), pct(busy, 0.5)
    a99, b99 = pct(alone, 0.99), pct(busy, 0.99)
    return {"enqueue_p50_ms": round(a50, 2), "enqueue_p99_ms": round(a99, 2),
            "enqueue_p50_ms_during_full_scan": round(b50, 2),
            "enqueue_p99_ms_during_full_scan": round(b99, 2),
            "p50_ratio": round(b50 / a50, 2), "p99_ratio": round(b99 / a99, 2),
            "full_scans_during": scans}


def jobs_in(s: Shard, status: str | None = None) -> int:
    return sum(c for (t, st), c in s.tenant_status.items()
               if t == T and (status is None or st == status))


@contextlib.asynccontextmanager
async def open_tenant_shard(data_dir: Path):
    """The bench tenant's shard of a data dir, opened as a server worker opens it."""
    async with fill.open_shard(data_dir, T, shards=SHARDS, tenancy=True) as (s, shard_map):
        # Enqueue into a tenant of the same shard (a job stored where a server finds it).
        enqueuer = next(t for t in (f"enqueuer-{i}" for i in range(10_000))
                        if shard_map.shard_for_tenant(t).shard_id == s.id)
        yield s, enqueuer


def storage_shape(s: Shard) -> dict[str, int]:
    """SlateDB's L0 SST and sorted-run counts of the shard (a point read looks in each
    L0 SST whose filter does not rule it out, so a fresh fill still being compacted
    reads slower than a settled shard)."""
    rec = METRICS_RECORDERS.get(f"shards/{s.id}")
    out: dict[str, int] = {}
    for m in rec.snapshot() if rec is not None else []:
        if m.name in ("slatedb.db.l0_sst_count", "slatedb.db.sorted_run_count"):
            out[m.name.rsplit(".", 1)[-1]] = int(m.value[0])
    return out


async def settle(s: Shard, max_s: float) -> float:
    """Wait (at most max_s) until the compactor has merged L0 down to 2 SSTs or fewer,
    as it has on a server that has been up a while; returns the seconds waited."""
    t0 = time.perf_counter()
    await asyncio.sleep(1.0)  # the open's background work
    while time.perf_counter() - t0 < max_s and storage_shape(s).get("l0_sst_count", 0) > 2:
        await asyncio.sleep(1.0)
    return round(time.perf_counter() - t0, 1)


async def bench_all(sizes: list[tuple[int, Path]], repeat: int, enqueues: int, rounds: int,
                    full_scan_max: int, settle_s: float) -> list[dict]:
    """Every size's shard open at once; each statement timed round-robin over the sizes,
    so load from other processes drifting over the run hits every size alike."""
    async with contextlib.AsyncExitStack() as stack:
        opened = []
        for n, d in sizes:
            s, enqueuer = await stack.enter_async_context(open_tenant_shard(d))
            have, failed = jobs_in(s), jobs_in(s, "Failed")
            if (have, failed) != (n, N_FAILED):
                raise SystemExit(f"{d} holds {have} jobs ({failed} Failed) of tenant {T!r}, "
                                 f"not {n} ({N_FAILED}): remove it to fill it again")
            opened.append((n, d, s, enqueuer))
        outs = []
        for n, d, s, _ in opened:
            out: dict = {"jobs": n, "data_dir": str(d), "storage_at_open": storage_shape(s)}
            out["settle_s"] = await settle(s, settle_s)
            out["storage"] = storage_shape(s)
            outs.append(out)
        for name, sql in QUERIES.items():
            for _, _, s, _ in opened:  # warm-up: first reads of each shard's blocks
                await timed_once(s, sql)
            samples: list[list[tuple[float, float, int]]] = [[] for _ in opened]
            for _ in range(repeat):
                for i, (_, _, s, _) in enumerate(opened):
                    samples[i].append(await timed_once(s, sql))
            for out, got in zip(outs, samples, strict=True):
                out[name] = summary(got)
        for out, (n, _, s, enqueuer) in zip(outs, opened, strict=True):
            if n <= full_scan_max:
                out["full scan"] = summary([await timed_once(s, FULL_SCAN)])
            out.update(await enqueue_under_scan(s, enqueuer, enqueues, rounds))
        return outs


def print_table(results: list[dict]) -> None:
    sizes = [f"{r['jobs']:,}" for r in results]
    print("median wall ms / median process CPU ms / keys read, per size (jobs in the tenant)")
    print(f"{'statement':18s} " + " ".join(f"{x:>24s}" for x in sizes) + "   max/min")
    for name in [*QUERIES, "full scan"]:
        cells, med = [], []
        for r in results:
            m = r.get(name)
            if m is None:
                cells.append(f"{'-':>24s}")
                continue
            med.append(m["median_ms"])
            cells.append(f"{m['median_ms']:>9.1f} /{m['cpu_median_ms']:>7.1f} /{m['keys_read']:>5d}")
        ratio = f"{max(med) / min(med):.2f}" if len(med) > 1 and min(med) > 0 else ""
        print(f"{name:18s} " + " ".join(cells) + f"   {ratio}")
    for key in ("enqueue_p99_ms", "enqueue_p99_ms_during_full_scan"):
        print(f"{key:32s} " + " ".join(f"{r.get(key, '-')!s:>10s}" for r in results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="1000,100000")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    ap.add_argument("--enqueues", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data-dir", default=None,
                    help="keep the pre-filled data dirs (DIR/jobs-N) here and reuse them")
    ap.add_argument("--settle-s", type=float, default=120,
                    help="wait at most this long for L0 compaction before measuring")
    ap.add_argument("--full-scan-max", type=int, default=100_000,
                    help="time one full scan only up to this many jobs")
    args = ap.parse_args()
    # Measure, do not enforce: no statement timeout, no slow-query log lines.
    settings.SETTINGS = settings.QuerySettings(statement_timeout_ms=0, slow_query_log_ms=0)
    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="silo-qb-"))
    results: list[dict] = []
    try:
        sizes = []
        fills: dict[int, dict] = {}
        for n in (int(x) for x in args.jobs.split(",")):
            d = root / f"jobs-{n}"
            if not (d / "shardmap.json").exists():
                t0 = time.perf_counter()
                fills[n] = prefill(d, n)
                print(f"filled {n:,} jobs in {time.perf_counter() - t0:.0f} s "
                      f"({fills[n]['jobs_per_s']:,} jobs/s)", file=sys.stderr, flush=True)
            sizes.append((n, d))
        results = asyncio.run(bench_all(sizes, args.repeat, args.enqueues, args.rounds,
                                        args.full_scan_max, args.settle_s))
        for r in results:
            f = fills.get(r["jobs"])
            r["prefilled"] = f is None
            if f is not None:
                r["fill_s"], r["fill_jobs_per_s"] = f["fill_s"], f["jobs_per_s"]
            print(json.dumps(r), flush=True)
        print_table(results)
    finally:
        if not args.data_dir:
            shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
