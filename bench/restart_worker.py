#!/usr/bin/env python3
"""The deep shard's worker's part of a restart, in one process, without gRPC.

    .venv/bin/python bench/restart_worker.py --from-dir /tmp/deep1m [--rounds 3]

Copies a data dir filled by bench/fill.py (tenancy off: the deep shard is tenant "-"'s),
then, per round, opens the shards its worker process owns concurrently, as
silo.runtime.node.Node.open does (shard i -> worker i mod 2), and leases one task of
task group `bench` from the deep shard: wall and CPU of the opens and of that lease.
CPU is the figure that holds on a box shared with other work. Run it with another
tree first on PYTHONPATH for a before/after (a tree whose Shard.open has no
count_depth parameter is opened the old way). See bench/README.md ("Restart at
1,000,000").
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # PYTHONPATH first: --tree style

from silo.cluster.shardmap import DEFAULT_TENANT, load_or_create  # noqa: E402
from silo.config import load_config  # noqa: E402
from silo.runtime.worker import shard_config  # noqa: E402
from silo.shard import lease  # noqa: E402
from silo.shard.state import Shard  # noqa: E402
from silo.storage.slatedb_settings import set_block_cache_bytes  # noqa: E402


async def rounds(data: Path, n: int, workers: int) -> None:
    conf = load_config({"data_dir": str(data), "tenancy": False}, os.environ, None)
    set_block_cache_bytes(conf.block_cache_bytes)
    sm, _ = load_or_create(data, 8)
    deep = sm.shard_for_tenant(DEFAULT_TENANT).shard_id
    k = [e.shard_id for e in sm.entries].index(deep)
    mine = [e for i, e in enumerate(sm.entries) if i % workers == k % workers]
    sc, url = shard_config(conf), conf.object_store_url_resolved()
    kw = {"count_depth": False} if "count_depth" in inspect.signature(Shard.open).parameters else {}
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        shards = await asyncio.gather(*(Shard.open(e.shard_id, e.range_start, e.range_end,
                                                   url, sc, **kw) for e in mine))
        t1, c1 = time.perf_counter(), time.process_time()
        s = next(x for x in shards if x.id == deep)
        got = await lease.lease_tasks(s, "restart-worker", 1, "bench")
        t2, c2 = time.perf_counter(), time.process_time()
        print(f"{len(mine)} opens: wall {t1 - t0:.3f} s, CPU {c1 - c0:.3f} s | first lease: wall"
              f" {t2 - t1:.3f} s, CPU {c2 - c1:.3f} s | total: wall {t2 - t0:.3f} s, CPU"
              f" {c2 - c0:.3f} s ({len(got)} task)", flush=True)
        await asyncio.gather(*(x.close() for x in shards))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-dir", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the server")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="silo-restart-worker-"))
    try:
        shutil.copytree(a.from_dir, tmp / "data", symlinks=True)
        asyncio.run(rounds(tmp / "data", a.rounds, a.workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
