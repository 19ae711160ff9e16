"""SlateDB calls awaited with and without silo.storage.wake, for instruction counts.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/wake_calls.py --mode native --ops 2000
    (and --mode generated, and --ops 0 for the fixed cost; see bench/README.md)
    .venv/bin/python bench/wake_calls.py --mode native --ops 20000 --committer 128

Each op is one durable put (completes on a Tokio thread) and one get (usually ready at
the first poll), in gathers of 50 like a shard's concurrent RPCs. Prints wall time, CPU
time of the process and its CPU per op, which stay comparable only on a quiet box;
callgrind's instruction total (all threads) is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from silo.storage import wake  # noqa: E402
from silo.storage.database import open_database  # noqa: E402

GATHER = 50


async def main(mode: str, ops: int, concurrency: int = 0) -> None:
    if mode == "native" and not wake.install():
        raise SystemExit("silo.storage._wake is not built")
    d = await open_database("file://" + tempfile.mkdtemp(), "bench", flush_interval_ms=10,
                            l0_sst_size_bytes=64 << 20)
    await d.put(b"warm", b"v")
    if concurrency:
        await committed(d, ops, concurrency)
        await d.shutdown()
        return
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, ops, GATHER):
        keys = [b"k%08d" % i for i in range(start, min(ops, start + GATHER))]
        await asyncio.gather(*(d.put(k, b"v" * 100) for k in keys))
        got = await asyncio.gather(*(d.get(k) for k in keys))
        assert all(v == b"v" * 100 for v in got)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await d.shutdown()
    per = f", {cpu / ops * 1e6:.1f} µs CPU per op" if ops else ""
    print(f"mode={mode} ops={ops} wall={wall:.3f}s cpu={cpu:.3f}s{per}")


async def committed(d, ops: int, concurrency: int) -> None:
    """`concurrency` tasks each staging one put and awaiting its group commit, like
    concurrent Enqueue RPCs on one shard (flush on commit, as the server runs it)."""
    from silo.storage.db import GroupCommitter  # noqa: PLC0415

    gc = GroupCommitter(d, commit_interval_s=0)
    gc.flush_on_commit = True
    n = 0

    async def worker(count: int) -> None:
        nonlocal n
        for _ in range(count):
            n += 1
            gc.put(b"c%012d" % n, b"v" * 200)
            await gc.commit()

    await worker(50)
    b0, t0, c0 = gc.batches_written, time.perf_counter(), time.process_time()
    per = ops // concurrency
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done, batches = per * concurrency, gc.batches_written - b0
    print(f"committer concurrency={concurrency} ops={done} wall={wall:.3f}s "
          f"{batches} batches ({done / max(batches, 1):.1f} ops each), "
          f"{cpu / done * 1e6:.1f} µs CPU per op, {cpu / max(batches, 1) * 1e6:,.0f} per batch")
    await gc.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("native", "generated"), default="native")
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--committer", type=int, default=0, metavar="CONCURRENCY",
                    help=">0: ops are puts through a GroupCommitter, this many at once")
    args = ap.parse_args()
    import uvloop  # noqa: PLC0415 - the server's loop

    uvloop.run(main(args.mode, args.ops, args.committer))
