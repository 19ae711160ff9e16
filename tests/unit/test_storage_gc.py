"""SlateDB's compactor and garbage collector actually reclaim a shard's objects.

A shard on a local object store (tmp dir) writes one WAL object per commit; with short
test intervals, WAL objects flushed to L0, SSTs compacted away and old manifests are
deleted (files counted in the store), and with the GC off nothing is.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from slatedb.uniffi import FlushOptions, FlushType, Settings

from silo.config import Config
from silo.shard import delete, enqueue, lease, outcome
from silo.shard.state import Shard, ShardConfig
from silo.storage.admin import storage_info
from silo.storage.slatedb_settings import (
    DEFAULT_BLOCK_CACHE_BYTES,
    StorageTuning,
    cache_id,
    configure_builder,
    set_block_cache_bytes,
    slatedb_settings,
)

_MEMTABLE = FlushOptions(flush_type=FlushType.MEM_TABLE)
FAST = StorageTuning(compactor_poll_interval_ms=100, gc_interval_s=1, gc_min_age_s=1,
                     gc_sst_min_age_s=2)


def files(root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in root.rglob("*"):
        if p.is_file():
            out.setdefault(p.parent.name, set()).add(p.name)
    return out


async def churn(s: Shard, n: int) -> None:
    """n jobs through enqueue -> lease -> success -> delete, one commit each step."""
    for i in range(n):
        jid = await enqueue.enqueue(s, tenant="-", job_id=f"j{i}", priority=50, start_at_ms=0,
                                    retry_policy=None, payload=b"\xa8" + b"x" * 512, limits=[],
                                    metadata={}, task_group="g")
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        await delete.delete_job(s, "-", jid)


def run(tmp_path: Path, tuning: StorageTuning, body):
    async def main():
        s = await Shard.open(str(uuid.uuid4()), "", "", (tmp_path / "store").as_uri(),
                             ShardConfig(commit_interval_ms=0, flush_interval_ms=1,
                                         flush_on_commit=True, l0_sst_size_bytes=32 << 10,
                                         slatedb=slatedb_settings(tuning)))
        try:
            return await body(s, tmp_path / "store")
        finally:
            await s.close()
    return asyncio.run(main())


def test_mapping_to_slatedb_keys():
    on = slatedb_settings(StorageTuning())
    assert on["compactor_options.poll_interval"] == "5000ms"
    assert on["compactor_options.worker.compactions_poll_interval"] == "5000ms"
    assert on["compactor_options.scheduler_options.min_compaction_sources"] == "2"
    assert on["garbage_collector_options.wal_options.interval"] == "30s"
    assert on["garbage_collector_options.wal_options.min_age"] == "30s"
    assert on["garbage_collector_options.manifest_options.min_age"] == "30s"
    assert on["garbage_collector_options.compactions_options.min_age"] == "30s"
    assert on["garbage_collector_options.compacted_options.min_age"] == "60s"
    assert on["compactor_options.checkpoint_lifetime"] == "60s"
    assert on["garbage_collector_options.boundary_files_enabled"] is False
    custom = slatedb_settings(StorageTuning(250, 7, 11, 13, 5))
    assert custom["compactor_options.poll_interval"] == "250ms"
    assert custom["compactor_options.scheduler_options.min_compaction_sources"] == "5"
    assert custom["garbage_collector_options.compacted_options.interval"] == "7s"
    assert custom["garbage_collector_options.wal_options.min_age"] == "11s"
    assert custom["garbage_collector_options.compacted_options.min_age"] == "13s"
    assert on["max_unflushed_bytes"] == 32 << 20 and custom["max_unflushed_bytes"] == 32 << 20
    assert slatedb_settings(StorageTuning(max_unflushed_bytes=8 << 20))[
        "max_unflushed_bytes"] == 8 << 20
    off = slatedb_settings(StorageTuning(compactor_poll_interval_ms=0, gc_interval_s=0))
    assert off == {"compactor_options": None, "garbage_collector_options": None,
                   "max_unflushed_bytes": 32 << 20}


def test_config_defaults_are_the_tuning_defaults():
    """The server builds StorageTuning from Config positionally (runtime/worker.py)."""
    c = Config()
    assert StorageTuning(c.compactor_poll_interval_ms, c.gc_interval_s, c.gc_min_age_s,
                         c.gc_sst_min_age_s, c.compactor_min_sources,
                         c.max_unflushed_bytes) == StorageTuning()
    assert c.block_cache_bytes == DEFAULT_BLOCK_CACHE_BYTES


class _Builder:
    def __init__(self) -> None:
        self.cache: tuple | None = None
        self.disabled = False

    def with_db_cache(self, cache, cache_id: int) -> None:
        self.cache = (cache, cache_id)

    def with_db_cache_disabled(self) -> None:
        self.disabled = True


def test_one_block_cache_per_process_shared_by_its_shards():
    """Every database of a process gets the same cache, each under its own stable id."""
    try:
        set_block_cache_bytes(1 << 20)
        a, b, a2 = _Builder(), _Builder(), _Builder()
        configure_builder(a, "shards/one")
        configure_builder(b, "shards/two")
        configure_builder(a2, "shards/one")
        assert a.cache is not None and b.cache is not None and a2.cache is not None
        assert a.cache[0] is b.cache[0] is a2.cache[0]
        assert a.cache[1] == a2.cache[1] != b.cache[1]
        assert 0 <= cache_id("shards/one") < 1 << 63
        set_block_cache_bytes(0)
        off = _Builder()
        configure_builder(off, "shards/one")
        assert off.disabled and off.cache is None
    finally:
        set_block_cache_bytes(DEFAULT_BLOCK_CACHE_BYTES)


def _applied(tuning: StorageTuning) -> dict:
    """The settings SlateDB ends up with (its own parser: types and key names checked)."""
    settings = Settings.default()
    for key, value in slatedb_settings(tuning).items():
        settings.set(key, json.dumps(value))
    return json.loads(settings.to_json_string())


def test_slatedb_accepts_the_mapping():
    s = _applied(StorageTuning())
    assert s["compactor_options"]["scheduler_options"] == {"min_compaction_sources": "2"}
    assert s["compactor_options"]["checkpoint_lifetime"] == "60s"
    gc = s["garbage_collector_options"]
    assert gc["compacted_options"] == {"interval": "30s", "min_age": "60s", "dry_run": False}
    assert gc["wal_options"]["min_age"] == "30s" and gc["boundary_files_enabled"] is False
    off = _applied(StorageTuning(compactor_poll_interval_ms=0, gc_interval_s=0))
    assert off["compactor_options"] is None and off["garbage_collector_options"] is None


def test_compaction_memory_bounds_reach_slatedb_from_the_server_config():
    """What a worker opens its shards with (runtime.worker.shard_config) bounds a
    compaction's memory: small output SSTs, one subcompaction, two compactions at once
    (SlateDB: 256 MiB, 4, 4), and the memtable bounds of Config."""
    from silo.runtime.worker import shard_config  # noqa: PLC0415 - the server's own path

    cfg = shard_config(Config())
    assert cfg.l0_sst_size_bytes == 8 << 20
    settings = Settings.default()
    for key, value in cfg.slatedb.items():
        settings.set(key, json.dumps(value))
    s = json.loads(settings.to_json_string())
    assert s["max_unflushed_bytes"] == 32 << 20
    c = s["compactor_options"]
    assert c["max_concurrent_compactions"] == 2
    assert c["worker"]["max_concurrent_compactions"] == 2
    assert c["worker"]["max_subcompactions"] == 1
    assert c["worker"]["max_sst_size"] == 32 << 20


def test_gc_deletes_wal_objects_compacted_ssts_and_manifests(tmp_path):
    async def body(s, root):
        seen: dict[str, set[str]] = {}

        def look() -> dict[str, set[str]]:
            now = files(root)
            for d, names in now.items():
                seen.setdefault(d, set()).update(names)
            return now
        for _ in range(6):  # ~600 commits: ~600 WAL objects, L0 flushes, compactions
            await churn(s, 25)
            look()
        assert len(seen["wal"]) > 500
        deadline = time.monotonic() + 90
        while True:
            now = look()
            gone = {d: seen[d] - now.get(d, set()) for d in ("wal", "compacted", "manifest")}
            if (len(gone["wal"]) > 400 and gone["compacted"] and gone["manifest"]
                    and len(now.get("manifest", ())) <= 3):
                break
            assert time.monotonic() < deadline, {d: len(v) for d, v in gone.items()}
            await asyncio.sleep(0.5)
        assert s.total_jobs == 0  # and the shard still works
        await churn(s, 3)
    run(tmp_path, FAST, body)


def test_nothing_is_deleted_with_the_gc_off(tmp_path):
    async def body(s, root):
        await churn(s, 40)
        written = files(root)
        await asyncio.sleep(3)  # many times the FAST intervals
        now = files(root)
        assert all(written[d] <= now.get(d, set()) for d in written)
    run(tmp_path, FAST._replace(gc_interval_s=0), body)


def test_compaction_drops_deleted_jobs_and_the_gc_reclaims_their_bytes(tmp_path):
    """Deleted jobs leave tombstones in L0; only a merge into the bottom sorted run drops
    them. With the default 2-source scheduling that happens within a few L0 flushes, and
    the GC then deletes the SSTs that held the jobs: the store's SST bytes fall to a small
    fraction of the SST bytes written."""
    async def body(s, root):
        sizes: dict[str, int] = {}  # every SST seen -> its size

        def sst_bytes_now() -> int:
            total = 0
            for p in (root / "shards").rglob("compacted/*.sst"):
                try:
                    sizes[p.name] = n = p.stat().st_size
                except FileNotFoundError:  # deleted by the GC meanwhile
                    continue
                total += n
            return total
        for _ in range(6):  # ~600 commits with a 32 KiB memtable: many L0 SSTs
            await churn(s, 25)
            sst_bytes_now()
        # The last jobs' tombstones are in the memtable: two more L0 SSTs (the 2-source
        # trigger) carry them to the bottom run.
        for _ in range(2):
            await s.db.flush_with_options(_MEMTABLE)
            sst_bytes_now()
        written = sum(sizes.values())
        assert written > 30_000 and len(sizes) > 4
        url = root.as_uri()
        deadline = time.monotonic() + 120
        while True:
            now = sst_bytes_now()
            info = await storage_info(url, s.id)
            live = info.total_l0_size + info.total_sorted_run_size
            if now < written * 0.2 and live < written * 0.05 and len(info.sorted_runs) <= 1:
                break
            assert time.monotonic() < deadline, (now, live, written, info)
            await asyncio.sleep(0.5)
        assert s.total_jobs == 0
