#!/usr/bin/env python3
"""Fill a server data dir with N jobs offline, fast, through the real shard code.

    .venv/bin/python bench/fill.py --data-dir DIR --jobs 1000000 [--tenant T] [--tenancy]
        [--shards 8] [--queued-only] [--groups 4] [--chunk 4000]

Pre-filling a million jobs over gRPC takes ten minutes or more; this builds the same data
in one process in a few. The dir is exactly what `silo serve --data-dir DIR` makes and
opens: the shard map (`shardmap.json`, created with --shards like the server creates it,
or the one already there), and the tenant's shard opened with `Shard.open` on the store
URL and ShardConfig the server derives from its configuration (`load_config` with these
flags and the SILO_* environment, as `silo serve` reads it). Every job goes through the
shard's ImportJobs operation (`silo.shard.import_`, the body of the ImportJobs RPC), so
the job rows, attempts, status index (0x03), metadata index (0x04), task rows, limit
chain and the shard and tenant status counters are the ones the server itself writes;
nothing here makes a key by hand. Chunks of --chunk jobs are imported and their durable
commit awaited before the next chunk is staged (at most --in-flight chunks at a time), so
no commit is large enough to trip the server's write bound.

Jobs `j0000000`.. of one tenant (with tenancy off, every job is tenant "-", which is what
a `--no-tenancy` bench server serves), payload a small msgpack map, priority i % 100,
task group g<i % --groups>, metadata:
* `user` = u<i> and `batch` = b<i:07d>: unique per job (exact and prefix lookups; the
  prefix b000004 matches 10 jobs at any N >= 50);
* `customer` = c<i % (N / 1000)>: each value shared by ~1,000 jobs, spread over statuses.

Status mix (--mix, per mille, default 850 Succeeded, 50 Failed, 30 Cancelled, 50 Waiting,
20 Scheduled), after the --first jobs (`Failed=100`: jobs 0-99 Failed, at any N):
Succeeded/Failed/Cancelled jobs carry one finished attempt; Waiting jobs are due now,
Scheduled ones start in a day. Running jobs are not offered: a job is Running only under
a live lease (ImportJobs refuses Running attempts), and a lease taken here would run out
lease_ms after the server opens the dir, so they would not stay Running. --queued-only makes every job Waiting in the one task group --queued-group
(default `bench`, the task group of bench/load.py and bench/deep_queue.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slatedb.uniffi import KeyRange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from silo.cluster.shardmap import DEFAULT_TENANT, load_or_create  # noqa: E402
from silo.config import load_config  # noqa: E402
from silo.runtime.server import lock_data_dir, unlock_data_dir  # noqa: E402
from silo.runtime.worker import shard_config  # noqa: E402
from silo.shard import import_  # noqa: E402
from silo.shard.state import Shard  # noqa: E402
from silo.storage import keys  # noqa: E402
from silo.storage.db import StorageError  # noqa: E402
from silo.storage.records import (  # noqa: E402
    ATTEMPT_CANCELLED,
    ATTEMPT_FAILED,
    ATTEMPT_SUCCEEDED,
)

STATUSES = ("Succeeded", "Failed", "Cancelled", "Waiting", "Scheduled")
DEFAULT_MIX = "850,50,30,50,20"
PAYLOAD = b"\x81\xa1i\x01"  # msgpack {"i": 1}
DAY_MS = 86_400_000
FILL_WRITE_TIMEOUT_MS = 600_000


def parse_mix(text: str) -> list[int]:
    """Per-mille weights of STATUSES (five integers, any sum > 0)."""
    parts = [int(x) for x in text.split(",")]
    if len(parts) != len(STATUSES) or min(parts) < 0 or sum(parts) <= 0:
        raise ValueError(f"--mix wants {len(STATUSES)} non-negative weights "
                         f"({'/'.join(STATUSES)}), got {text!r}")
    return parts


def status_of(i: int, mix: list[int]) -> str:
    """Job i's status: the mix laid out over each block of sum(mix) consecutive jobs,
    interleaved (a stride walk), so every status spreads over the whole id range."""
    total = sum(mix)
    slot = (i * 7919) % total  # 7919 is prime: a permutation of the block unless total % 7919 == 0
    for name, w in zip(STATUSES, mix, strict=True):
        if slot < w:
            return name
        slot -= w
    return STATUSES[0]


def parse_first(text: str) -> tuple[tuple[str, int], ...]:
    """`Failed=100,Waiting=1000` → the statuses of the first jobs, in order."""
    out = []
    for part in filter(None, text.split(",")):
        name, _, count = part.partition("=")
        if name not in STATUSES or not count.isdigit():
            raise ValueError(f"--first wants STATUS=N[,STATUS=N...] with STATUS one of "
                             f"{'/'.join(STATUSES)}, got {part!r}")
        out.append((name, int(count)))
    return tuple(out)


def status_for(i: int, mix: list[int], first: tuple[tuple[str, int], ...] = ()) -> str:
    """Job i's status: the --first runs, then the mix."""
    for name, count in first:
        if i < count:
            return name
        i -= count
    return status_of(i, mix)


def make_job(i: int, n: int, now: int, mix: list[int], groups: int, queued_only: bool,
             queued_group: str, first: tuple[tuple[str, int], ...] = ()
             ) -> tuple[import_.ImportJob, str]:
    """Job i of n and the status it will have once imported."""
    status = "Waiting" if queued_only else status_for(i, mix, first)
    start = 0
    done = now - 10**7 + i  # finished at distinct times, newest last
    if status == "Succeeded":
        attempts = [import_.ImportedAttempt(ATTEMPT_SUCCEEDED, done - 1000, done)]
    elif status == "Failed":  # no retry policy: one failed attempt ends the job
        attempts = [import_.ImportedAttempt(ATTEMPT_FAILED, done - 1000, done,
                                            error_code="bench")]
    elif status == "Cancelled":
        attempts = [import_.ImportedAttempt(ATTEMPT_CANCELLED, done - 1000, done)]
    else:
        attempts = []
        if status == "Scheduled":
            start = now + DAY_MS
    group = queued_group if queued_only else f"g{i % groups}"
    metadata = {"user": f"u{i}", "batch": f"b{i:07d}", "customer": f"c{i % max(1, n // 1000)}"}
    job = import_.ImportJob(f"j{i:07d}", i % 100, now - 2 * 10**7 + i, start, None, PAYLOAD,
                            [], metadata, group, attempts)
    return job, status


class ExistencePrefetch:
    """Answers the import's per-job "does this id exist?" reads of one chunk from one
    range scan of the chunk's job-info keys instead of one SlateDB get each.

    The answers are the ones `GroupCommitter.get` would give: writes not yet applied
    still win (`staged_value` first), and the scan reads the database after every write
    this process made before the chunk (we are its only writer: the dir's lock is held).
    Only keys of the chunk's ids are answered here; every other read goes to storage.
    Without it each job costs one awaited get, the committer writes a few jobs per batch
    between them, and the fill runs at a third of the speed.
    """

    def __init__(self, shard: Shard) -> None:
        self.committer = shard.committer
        self.db = shard.db
        self.real_get = shard.committer.get
        self.known: set[bytes] = set()
        self.found: dict[bytes, bytes] = {}
        shard.committer.get = self.get  # type: ignore[method-assign]

    async def load(self, tenant: str, job_ids: list[str]) -> None:
        wanted = sorted(keys.job_info(tenant, j) for j in job_ids)
        try:
            it = await self.db.scan(KeyRange(start=wanted[0], start_inclusive=True,
                                             end=wanted[-1], end_inclusive=True))
            want = set(wanted)
            while rows := await it.next_batch(1024):
                self.found.update((r.key, r.value) for r in rows if r.key in want)
        except Exception as e:  # noqa: BLE001 - as GroupCommitter.get reports it
            raise StorageError(f"scan failed: {e}") from e
        self.known.update(wanted)

    def forget(self, tenant: str, job_ids: list[str]) -> None:
        for j in job_ids:
            k = keys.job_info(tenant, j)
            self.known.discard(k)
            self.found.pop(k, None)

    async def get(self, key: bytes) -> bytes | None:
        found, value = self.committer.staged_value(key)
        if found:
            return value
        if key in self.known:
            return self.found.get(key)
        return await self.real_get(key)


def chunks(n: int, size: int) -> Iterator[range]:
    for a in range(0, n, size):
        yield range(a, min(n, a + size))


@contextlib.asynccontextmanager
async def open_shard(data_dir: Path, tenant: str, *, shards: int, tenancy: bool,
                     min_write_timeout_ms: int = 0):
    """The tenant's shard of a server data dir (created if new), opened as a server
    worker opens it, with the dir's lock held: yields (shard, shard map).

    min_write_timeout_ms raises the write bound: offline nobody waits for an answer, so
    the bound (which fails a serving shard's callers fast when storage stalls) only needs
    to catch a dead store; a commit slowed by compaction on a loaded box is no failure."""
    config = load_config({"data_dir": str(data_dir), "shards": shards, "tenancy": tenancy},
                         os.environ, None)
    fd = lock_data_dir(data_dir)
    try:
        shard_map, _ = load_or_create(data_dir, config.shards)
        entry = shard_map.shard_for_tenant(tenant)
        cfg = shard_config(config)
        cfg.write_timeout_ms = max(cfg.write_timeout_ms, min_write_timeout_ms)
        shard = await Shard.open(entry.shard_id, entry.range_start, entry.range_end,
                                 config.object_store_url_resolved(), cfg)
        try:
            yield shard, shard_map
        finally:
            await shard.close()
    finally:
        unlock_data_dir(data_dir, fd)


async def fill(data_dir: Path, n: int, *, tenant: str | None = None, tenancy: bool = False,
               shards: int = 8, mix: list[int] | None = None, groups: int = 4,
               queued_only: bool = False, queued_group: str = "bench", chunk: int = 4000,
               in_flight: int = 2, start: int = 0, first: tuple[tuple[str, int], ...] = (),
               progress: bool = False) -> dict[str, Any]:
    """Import jobs start..start+n-1 into the tenant's shard of the data dir; returns counts
    by status and the timing. The dir must not be in use by a server (its lock is held)."""
    mix = mix or parse_mix(DEFAULT_MIX)
    tenant = tenant if tenant is not None else DEFAULT_TENANT
    if not tenancy and tenant != DEFAULT_TENANT:
        raise ValueError(f"with tenancy off every job is tenant {DEFAULT_TENANT!r}; "
                         f"pass --tenancy to fill tenant {tenant!r}")
    data_dir.mkdir(parents=True, exist_ok=True)
    t_open = time.perf_counter()
    async with open_shard(data_dir, tenant, shards=shards, tenancy=tenancy,
                          min_write_timeout_ms=FILL_WRITE_TIMEOUT_MS) as (shard, _):
        open_s = time.perf_counter() - t_open
        counts = dict.fromkeys(STATUSES, 0)
        t0 = time.perf_counter()
        now = shard.now()
        done = 0
        slowest = [0.0]  # the longest import call (staging + its durable commit), s
        prefetch = ExistencePrefetch(shard)

        async def one(ids: range) -> None:
            nonlocal done
            batch = [make_job(i, start + n, now, mix, groups, queued_only, queued_group,
                              first)
                     for i in ids]
            job_ids = [j.id for j, _ in batch]
            await prefetch.load(tenant, job_ids)
            t = time.perf_counter()
            try:
                results = await import_.import_jobs(shard, tenant, [j for j, _ in batch])
            finally:
                prefetch.forget(tenant, job_ids)
            slowest[0] = max(slowest[0], time.perf_counter() - t)
            bad = [r for r in results if not r.success]
            if bad:
                raise RuntimeError(f"import refused {len(bad)} jobs: {bad[0].error}")
            for _, st in batch:
                counts[st] += 1
            done += len(ids)
            if progress and done % (chunk * 25) < len(ids):
                el = time.perf_counter() - t0
                print(f"  {done:,} jobs, {done / el:,.0f} jobs/s", file=sys.stderr,
                      flush=True)

        # At most in_flight chunks at once: while one chunk's commit is in flight the
        # next is staged (the committer writes it as the next batch), never more.
        pending: set[asyncio.Future[None]] = set()
        for ids in chunks(n, chunk):
            if len(pending) >= max(1, in_flight):
                finished, pending = await asyncio.wait(
                    pending, return_when=asyncio.FIRST_COMPLETED)
                for f in finished:
                    f.result()
            pending.add(asyncio.ensure_future(
                one(range(start + ids.start, start + ids.stop))))
        for f in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(f, BaseException):
                raise f
        fill_s = time.perf_counter() - t0
        t_close = time.perf_counter()  # the shard closes (and flushes) at the block's end
    close_s = time.perf_counter() - t_close
    return {"data_dir": str(data_dir), "shard": shard.id, "tenant": tenant,
            "jobs": n, "counts": counts, "open_s": round(open_s, 2),
            "fill_s": round(fill_s, 2), "close_s": round(close_s, 2),
            "jobs_per_s": round(n / fill_s) if fill_s > 0 else None,
            "slowest_chunk_s": round(slowest[0], 2)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="the server data dir to create or add to")
    ap.add_argument("--jobs", type=int, required=True)
    ap.add_argument("--tenant", default=None,
                    help=f"tenant of every job (default {DEFAULT_TENANT!r}, the tenancy-off one)")
    ap.add_argument("--tenancy", action=argparse.BooleanOptionalAction, default=None,
                    help="the server's tenancy setting (default: on iff --tenant is given)")
    ap.add_argument("--shards", type=int, default=8,
                    help="shards of a new data dir (bench servers' default: 8)")
    ap.add_argument("--mix", default=DEFAULT_MIX,
                    help="per-mille weights of " + "/".join(STATUSES) + f" ({DEFAULT_MIX})")
    ap.add_argument("--first", default="",
                    help="statuses of the first jobs before the mix, e.g. Failed=100 (a status "
                         "whose count stays the same at every N)")
    ap.add_argument("--groups", type=int, default=4, help="task groups g0..g<N-1>")
    ap.add_argument("--queued-only", action="store_true",
                    help="every job Waiting in --queued-group (deep-queue benches)")
    ap.add_argument("--queued-group", default="bench")
    ap.add_argument("--chunk", type=int, default=4000, help="jobs per durable commit")
    ap.add_argument("--in-flight", type=int, default=2, help="chunks staged/committing at once")
    ap.add_argument("--start", type=int, default=0,
                    help="first job number (to add more jobs to a filled dir)")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tenancy = a.tenancy if a.tenancy is not None else a.tenant is not None
    try:
        mix = parse_mix(a.mix)
        first = parse_first(a.first)
    except ValueError as e:
        print(f"fill: {e}", file=sys.stderr)
        return 2
    r = asyncio.run(fill(Path(a.data_dir), a.jobs, tenant=a.tenant, tenancy=tenancy,
                         shards=a.shards, mix=mix, groups=max(1, a.groups),
                         queued_only=a.queued_only, queued_group=a.queued_group,
                         chunk=max(1, a.chunk), in_flight=a.in_flight, start=a.start, first=first,
                         progress=True))
    print(f"filled {r['jobs']:,} jobs into {r['data_dir']} (tenant {r['tenant']!r}, "
          f"shard {r['shard']}) in {r['fill_s']} s: {r['jobs_per_s']:,} jobs/s "
          f"(open {r['open_s']} s, close {r['close_s']} s, slowest chunk "
          f"{r['slowest_chunk_s']} s)")
    print("  " + ", ".join(f"{k} {v:,}" for k, v in r["counts"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
