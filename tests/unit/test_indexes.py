"""The status (0x03) and metadata (0x04) indexes always describe exactly the stored jobs.

After every kind of transition, after a reopen, and after the backfill of a data dir
written without indexes, the index rows equal those derived from the 0x02/0x01 rows.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from silo.shard import cancel, delete, expedite, lease, outcome, restart
from silo.shard.indexes import layout_version
from silo.shard.state import Shard, ShardConfig, status_index_key
from silo.storage import keys
from silo.storage.database import scan_prefix
from silo.storage.records import (
    RetryPolicy,
    encode_i64,
    job_info_decoder,
    job_status_decoder,
)
from tests.unit.test_shard import T0, Clock, add

RETRY = RetryPolicy(retry_count=1, initial_interval_ms=100, max_interval_ms=100,
                    randomize_interval=False, backoff_factor=1.0)


async def derived_and_actual(s: Shard) -> tuple[set, set, set, set]:
    c = s.committer
    want_status = set()
    for k, v in await c.scan_prefix(keys.kind_prefix(keys.JOB_STATUS)):
        tenant, pos = keys.dec_str(k, 1)
        job_id, _ = keys.dec_str(k, pos)
        want_status.add(status_index_key(tenant, job_id, job_status_decoder.decode(v)))
    want_meta = set()
    for _, v in await c.scan_prefix(keys.kind_prefix(keys.JOB_INFO)):
        info = job_info_decoder.decode(v)
        want_meta |= {keys.metadata_index(info.tenant, a, b, info.id)
                      for a, b in info.metadata.items()}
    have_status = {k for k, _ in await c.scan_prefix(keys.kind_prefix(keys.STATUS_INDEX))}
    have_meta = {k for k, _ in await c.scan_prefix(keys.kind_prefix(keys.METADATA_INDEX))}
    return want_status, have_status, want_meta, have_meta


TIME_KINDS = (keys.GROUP_TIME_INDEX, keys.METADATA_TIME_INDEX)


async def time_rows(s: Shard) -> tuple[set, set]:
    """(the 0x10/0x11 rows the job infos imply, the rows stored)."""
    want = set()
    for _, v in await s.committer.scan_prefix(keys.kind_prefix(keys.JOB_INFO)):
        info = job_info_decoder.decode(v)
        want |= set(keys.time_index_rows(info.tenant, info.id, info.enqueue_time_ms,
                                         info.task_group, info.metadata))
    have = set()
    for kind in TIME_KINDS:
        have |= {k for k, _ in await s.committer.scan_prefix(keys.kind_prefix(kind))}
    return want, have


async def check(s: Shard) -> None:
    ws, hs, wm, hm = await derived_and_actual(s)
    assert hs == ws
    assert hm == wm
    wt, ht = await time_rows(s)
    assert ht == wt
    for (tenant, job_id), job in s.active.items():
        raw = await s.committer.get(keys.job_status(tenant, job_id))
        assert job.index_key == status_index_key(tenant, job_id, job_status_decoder.decode(raw))


async def every_transition(s: Shard, clock: Clock) -> None:
    """Drive each operation that changes a status, checking the invariant after each."""
    await add(s, "ok", metadata={"env": "prod", "team": "a"})
    await add(s, "fail", retry=RETRY, metadata={"env": "dev"}, tenant="t2")
    await add(s, "future", start_at_ms=T0 + 60_000)
    await add(s, "cancel-me", start_at_ms=T0 + 60_000, metadata={"env": "prod"})
    await check(s)
    got = await lease.lease_tasks(s, "w", 10, "g")
    await check(s)
    by_id = {lt.lease.task.job_id: lt.lease.task.task_id for lt in got}
    await outcome.report_outcome(s, by_id["ok"], outcome.Success(b""))
    await outcome.report_outcome(s, by_id["fail"], outcome.Failure("E", b""))  # retry
    await check(s)
    clock.t += 100
    [lt] = await lease.lease_tasks(s, "w", 10, "g")
    await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))
    await check(s)
    await expedite.expedite_job(s, "-", "future")
    await cancel.cancel_job(s, "-", "cancel-me")
    await check(s)
    await restart.restart_job(s, "t2", "fail")
    await restart.restart_job(s, "-", "cancel-me")
    await check(s)
    await cancel.cancel_job(s, "-", "cancel-me")
    await delete.delete_job(s, "-", "cancel-me")
    await delete.delete_job(s, "-", "ok")
    await check(s)


def _open(url: str, sid: str, clock: Clock):
    return Shard.open(sid, "", "", url, ShardConfig(commit_interval_ms=0, flush_interval_ms=1),
                      clock)


def test_indexes_follow_every_transition_and_survive_reopen(tmp_path):
    url, sid, clock = f"file://{tmp_path}/o", str(uuid.uuid4()), Clock()

    async def main():
        s = await _open(url, sid, clock)
        assert await layout_version(s) == keys.LAYOUT_VERSION
        await every_transition(s, clock)
        await s.close()
        s = await _open(url, sid, clock)
        await check(s)
        # Active jobs reloaded their index rows: a transition after reopen moves them.
        await lease.lease_tasks(s, "w", 10, "g")
        await check(s)
        await s.close()
    asyncio.run(main())


def test_layout_1_data_dir_is_backfilled_once(tmp_path, caplog):
    url, sid, clock = f"file://{tmp_path}/o", str(uuid.uuid4()), Clock()

    async def main():
        s = await _open(url, sid, clock)
        await every_transition(s, clock)
        ws, _, wm, _ = await derived_and_actual(s)
        assert ws and wm
        # Turn it into what the first release wrote: no index rows, no layout_version.
        for kind in (keys.STATUS_INDEX, keys.METADATA_INDEX, *TIME_KINDS):
            for k, _ in await scan_prefix(s.db, keys.kind_prefix(kind)):
                s.committer.delete(k)
        s.committer.delete(keys.shard_meta("layout_version"))
        await s.committer.commit()
        _, hs, _, hm = await derived_and_actual(s)
        assert not hs and not hm
        await s.close()
        with caplog.at_level(logging.INFO, logger="silo.shard.indexes"):
            s = await _open(url, sid, clock)
        assert "backfill done" in caplog.text
        assert await layout_version(s) == keys.LAYOUT_VERSION
        await check(s)
        await lease.lease_tasks(s, "w", 10, "g")
        await check(s)
        await s.close()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="silo.shard.indexes"):
            s = await _open(url, sid, clock)
        assert "backfill" not in caplog.text
        await s.close()
    asyncio.run(main())


def test_layout_2_data_dir_gets_the_enqueue_time_indexes(tmp_path, caplog):
    url, sid, clock = f"file://{tmp_path}/o", str(uuid.uuid4()), Clock()

    async def main():
        s = await _open(url, sid, clock)
        await every_transition(s, clock)
        for i in range(30):  # more than a backfill batch would need with a tiny batch
            await add(s, f"many-{i}", metadata={"env": "prod"}, group=f"g{i % 3}")
        wt, _ = await time_rows(s)
        assert len(wt) > 60
        # What layout 2 wrote: status and metadata indexes, no enqueue-time rows.
        for kind in TIME_KINDS:
            for k, _ in await scan_prefix(s.db, keys.kind_prefix(kind)):
                s.committer.delete(k)
        s.committer.put(keys.shard_meta("layout_version"), encode_i64(2))
        await s.committer.commit()
        assert not (await time_rows(s))[1]
        await s.close()
        with caplog.at_level(logging.INFO, logger="silo.shard.indexes"):
            s = await _open(url, sid, clock)
        assert "layout 2 found" in caplog.text and "backfill done" in caplog.text
        assert await layout_version(s) == keys.LAYOUT_VERSION == 4
        await check(s)
        await s.close()
    asyncio.run(main())


def test_inlined_status_key_equals_the_layout_function():
    from silo.storage.records import STATUS_NAMES, JobStatus  # noqa: PLC0415

    for kind, name in STATUS_NAMES.items():
        for ts in (0, 5, T0):
            st = JobStatus(kind, ts, ts + 7 if kind == 0 else None, 1)
            want_ts = ts + 7 if kind == 0 else ts
            assert status_index_key("t\x00x", "j", st) == keys.status_index(
                "t\x00x", name, want_ts, "j")
