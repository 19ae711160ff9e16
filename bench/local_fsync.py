"""What storage.local_fsync costs per commit: the fsync round's time (in the fsync pool)
and the commit's latency as a caller sees it, on vs off, on a tmp directory store.

    PYTHONPATH=. python bench/local_fsync.py --commits 2000 [--concurrency 1] [--dir DIR]
        [--modes off,pool,native] [--repeat 1]

One GroupCommitter over a real SlateDB database (flush_on_commit, as the server runs
it); `--concurrency N` keeps N operations in flight (group commit gathers them). Prints
one JSON line per mode; `loop_cpu_us_per_commit` is the event loop thread's CPU (the
fsync itself runs off it and is not in it). Modes: `off` (storage.local_fsync off),
`pool` (rounds in the Python thread pool, local_sync.NATIVE off), `native` (rounds on
_walsync's C threads, the default when it is built), `native-seq` (the same with the
directory fsync after the files, local_sync.OVERLAP off); `--repeat` alternates them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
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


async def run(mode: str, commits: int, concurrency: int, base: str) -> dict[str, object]:
    wake.install()
    on = mode != "off"
    local_sync.configure(on)
    local_sync.NATIVE = mode.startswith("native")
    local_sync.OVERLAP = mode != "native-seq"
    rounds: list[float] = []
    orig = local_sync.LocalSync._spent

    def timed(self, shard, seconds):
        rounds.append(seconds)
        orig(self, shard, seconds)
    local_sync.LocalSync._spent = timed
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
    r0 = resource.getrusage(resource.RUSAGE_THREAD)
    p0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    wall, loop_cpu = time.perf_counter() - t0, time.thread_time() - c0
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    p1 = resource.getrusage(resource.RUSAGE_SELF)
    proc_cpu = p1.ru_utime + p1.ru_stime - p0.ru_utime - p0.ru_stime
    batches = c.batches_written
    await c.close()
    await db.shutdown()
    local_sync.LocalSync._spent = orig
    return {"mode": mode, "ops": commits, "concurrency": concurrency, "commits": batches,
            "ops_per_s": round(commits / wall),
            "loop_cpu_us_per_commit": round(loop_cpu / max(batches, 1) * 1e6, 1),
            "process_cpu_us_per_commit": round(proc_cpu / max(batches, 1) * 1e6, 1),
            "loop_sys_us_per_commit": round((r1.ru_stime - r0.ru_stime) / max(batches, 1) * 1e6,
                                            1),
            "loop_switches_per_commit": round((r1.ru_nvcsw + r1.ru_nivcsw - r0.ru_nvcsw
                                               - r0.ru_nivcsw) / max(batches, 1), 2),
            "op_ms_p50": round(_pct(lat, .5), 3),
            "op_ms_p99": round(_pct(lat, .99), 3),
            "fsync_rounds": len(rounds), "fsync_ms_p50": round(_pct(rounds, .5), 3),
            "fsync_ms_p99": round(_pct(rounds, .99), 3),
            "fsync_ms_mean": round(statistics.fmean(rounds) * 1e3, 3) if rounds else 0.0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--commits", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--dir", default=None, help="where the tmp stores go (default: $TMPDIR)")
    p.add_argument("--modes", default="off,pool,native")
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    for _ in range(a.repeat):
        for mode in a.modes.split(","):
            r = asyncio.run(run(mode, a.commits, a.concurrency, a.dir))
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
