"""What storage.local_fsync costs per commit: the fsync round's time (in the fsync pool)
and the commit's latency as a caller sees it, on vs off, on a tmp directory store.

    PYTHONPATH=. python bench/local_fsync.py --commits 2000 [--concurrency 1] [--dir DIR]

One GroupCommitter over a real SlateDB database (flush_on_commit, as the server runs
it); `--concurrency N` keeps N operations in flight (group commit gathers them). Prints
one JSON line per mode; `loop_cpu_us_per_commit` is the event loop thread's CPU (the
fsync itself runs in the pool and is not in it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from silo.storage import db as sdb  # noqa: E402
from silo.storage import local_sync, wake  # noqa: E402
from silo.storage.database import open_database  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e3 if xs else 0.0


async def run(on: bool, commits: int, concurrency: int, base: str) -> dict[str, object]:
    wake.install()
    local_sync.configure(on)
    rounds: list[float] = []
    if on:
        orig = local_sync.LocalSync.sync_wal

        def timed(self, wrote):
            spent = orig(self, wrote)
            rounds.append(spent)
            return spent
        local_sync.LocalSync.sync_wal = timed
    d = tempfile.mkdtemp(dir=base)
    db = await open_database(f"file://{d}", "shards/b", flush_interval_ms=10,
                             l0_sst_size_bytes=64 << 20, flush_on_commit=True)
    c = sdb.GroupCommitter(db, commit_interval_s=0)
    c.flush_on_commit = True
    rounds.clear()
    lat: list[float] = []
    payload = b"x" * 300
    left = commits

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        c.put(b"job%08d" % i, payload)
        await c.commit()
        lat.append(time.perf_counter() - t0)

    async def lane(k: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one(left)

    t0, c0 = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    wall, loop_cpu = time.perf_counter() - t0, time.thread_time() - c0
    batches = c.batches_written
    await c.close()
    await db.shutdown()
    if on:
        local_sync.LocalSync.sync_wal = orig
    return {"local_fsync": on, "ops": commits, "concurrency": concurrency, "commits": batches,
            "ops_per_s": round(commits / wall),
            "loop_cpu_us_per_commit": round(loop_cpu / max(batches, 1) * 1e6, 1), "op_ms_p50": round(_pct(lat, .5), 3),
            "op_ms_p99": round(_pct(lat, .99), 3),
            "fsync_rounds": len(rounds), "fsync_ms_p50": round(_pct(rounds, .5), 3),
            "fsync_ms_p99": round(_pct(rounds, .99), 3),
            "fsync_ms_mean": round(statistics.fmean(rounds) * 1e3, 3) if rounds else 0.0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the tmp stores go (default: $TMPDIR)")
    a = p.parse_args()
    for on in (False, True):
        print(json.dumps(asyncio.run(run(on, a.commits, a.concurrency, a.dir))), flush=True)


if __name__ == "__main__":
    main()
