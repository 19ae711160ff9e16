#!/usr/bin/env python3
"""Instructions (callgrind) or CPU per job of one shard's whole job life, without gRPC.

    PYTHONPATH=. .venv/bin/python bench/shard_life.py --callgrind [--rounds 4] [--fill c]
    PYTHONPATH=. .venv/bin/python bench/shard_life.py [--rounds 8] [--fill python]

A round enqueues 200 jobs over 16 tenants (100 B payload, one metadata pair, concurrently
like RPCs arriving together), leases them 16 per call and reports each a success, all on
one `Shard` over SlateDB's in-memory store with the server's GC tuning and uvloop. Three
warm-up rounds run first.

`--callgrind` runs this script under `valgrind --tool=callgrind` twice, with 1 and with
--rounds timed rounds, and prints the difference in instructions (all threads) per job
of the extra rounds: start-up, warm-up and shutdown cancel out, and an instruction
count does not move with the load of a shared box. Without it, prints CPU and wall per
job from one run (load-sensitive).

`--fill python` makes the shard's group committer fill its WriteBatches with the pure
Python fill instead of the C one (`silo.storage.ffi.batch_writer(native=False)`), for an
A/B of the C fill in one tree; `--fill c` (the default) is what the server uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPS = 200
GROUP = "bench"
TENANTS = [f"tenant-{i}" for i in range(16)]
WARMUP_ROUNDS = 3


async def life(rounds: int) -> dict[str, float]:
    from silo.shard import enqueue, lease, outcome
    from silo.shard.state import Shard, ShardConfig

    payload = os.urandom(100)
    s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                         ShardConfig(commit_interval_ms=0, flush_interval_ms=10,
                                     flush_on_commit=True, write_timeout_ms=3_600_000))

    async def one_round() -> int:
        await asyncio.gather(*(
            enqueue.enqueue(s, tenant=TENANTS[j % 16], job_id="", priority=50, start_at_ms=0,
                            retry_policy=None, payload=payload, limits=[],
                            metadata={"k": "v"}, task_group=GROUP)
            for j in range(OPS)))
        got = await asyncio.gather(*(lease.lease_tasks(s, "w", 16, GROUP)
                                     for _ in range(OPS // 16 + 1)))
        ids = [lt.lease.task.task_id for b in got for lt in b]
        await asyncio.gather(*(outcome.report_outcome(s, t, outcome.Success(b"ok"))
                               for t in ids))
        return len(ids)

    try:
        for _ in range(WARMUP_ROUNDS):
            await one_round()
        jobs, c0, t0 = 0, time.process_time(), time.perf_counter()
        commits0 = s.committer.batches_written
        for _ in range(rounds):
            jobs += await one_round()
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        return {"jobs": jobs, "cpu_us_per_job": cpu / jobs * 1e6,
                "wall_us_per_job": wall / jobs * 1e6,
                "commits": s.committer.batches_written - commits0,
                "fill": s.committer._fill.impl if hasattr(s.committer._fill, "impl") else "?"}
    finally:
        await s.close()


def run_here(rounds: int, fill: str) -> dict[str, float]:
    import uvloop

    from silo.runtime.server import tune_gc
    from silo.storage import ffi

    if fill == "python":
        pure = ffi.batch_writer

        def batch_writer(*, native=None):
            return pure(native=False)

        ffi.batch_writer = batch_writer
    tune_gc()
    return uvloop.run(life(rounds))


def callgrind(rounds: int, fill: str) -> None:
    counts = {}
    for n in (1, rounds):
        with tempfile.TemporaryDirectory(prefix="silo-cg-") as d:
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/cg.out",
                 sys.executable, __file__, "--rounds", str(n), "--fill", fill],
                capture_output=True, text=True, cwd=ROOT, check=True)
        m = re.search(r"Collected : (\d+)", out.stderr)
        if not m:
            sys.exit(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")
        counts[n] = int(m.group(1))
        print(f"  {n} round(s): {counts[n]:,} instructions; {out.stdout.strip()}")
    per_job = (counts[rounds] - counts[1]) / ((rounds - 1) * OPS)
    print(f"fill={fill}: {per_job / 1e6:.3f} M instructions per job "
          f"(callgrind, rounds {rounds} - 1, all threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds of 200 jobs (default 4 with --callgrind, else 8)")
    ap.add_argument("--fill", choices=("c", "python"), default="c",
                    help="WriteBatch fill: the C one where built (default) or pure Python")
    ap.add_argument("--callgrind", action="store_true",
                    help="instructions per job under callgrind (runs itself twice)")
    a = ap.parse_args()
    if a.callgrind:
        callgrind(max(2, a.rounds or 4), a.fill)
        return
    r = run_here(a.rounds or 8, a.fill)
    print(f"jobs {r['jobs']}  cpu/job {r['cpu_us_per_job']:.1f} us  "
          f"wall/job {r['wall_us_per_job']:.1f} us  commits {r['commits']}  fill {r['fill']}")


if __name__ == "__main__":
    main()
