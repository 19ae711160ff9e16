"""Retention of finished jobs (jobs.completed_job_expire_s / terminal_job_expire_s).

A real shard on the memory store with a fake clock: jobs expire exactly at their time,
with all their rows and counters; restarted or re-imported jobs survive their old row;
nothing happens when retention is off; readers racing the sweeper see a whole job or
NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from silo.errors import SiloError
from silo.shard import cancel, get_job, import_, lease, outcome, restart
from silo.shard.retention import due_rows, expire_due
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.database import scan_prefix
from silo.storage.records import ATTEMPT_FAILED, FAILED, SUCCEEDED
from tests.unit.test_shard import T0, Clock, add, code

OK_TTL, END_TTL = 1000, 5000


def run(coro_fn, *, completed=OK_TTL, terminal=END_TTL):
    async def main():
        clock = Clock()
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///", ShardConfig(
            commit_interval_ms=0, flush_interval_ms=1, completed_job_expire_ms=completed,
            terminal_job_expire_ms=terminal), clock)
        try:
            return await coro_fn(s, clock)
        finally:
            await s.close()
    return asyncio.run(main())


async def finish(s: Shard, clock: Clock, job_id: str, how="ok") -> None:
    await add(s, job_id)
    [lt] = await lease.lease_tasks(s, "w", 1, "g")
    o = outcome.Success(b"\xa1r") if how == "ok" else outcome.Failure("E", b"")
    await outcome.report_outcome(s, lt.lease.task.task_id, o)


async def exists(s: Shard, job_id: str) -> bool:
    try:
        await get_job.get_job(s, "-", job_id, True)
    except SiloError as e:
        assert code_of(e) == "NOT_FOUND"
        return False
    return True


def code_of(e: SiloError) -> str:
    return e.code.name


async def expiry_rows(s: Shard) -> list[tuple[int, str, str]]:
    await s.committer.commit()
    return [keys.decode_expiry_index(k)
            for k, _ in await scan_prefix(s.db, keys.kind_prefix(keys.EXPIRY_INDEX))]


def test_succeeded_job_expires_at_its_time_with_all_its_rows():
    async def t(s, clock):
        await finish(s, clock, "a")
        assert await expiry_rows(s) == [(T0 + OK_TTL, "-", "a")]
        clock.t += OK_TTL - 1
        assert await expire_due(s) == 0 and await exists(s, "a")
        clock.t += 1
        assert await expire_due(s) == 1
        assert not await exists(s, "a")
        with pytest.raises(SiloError) as e:
            await get_job.get_job_result(s, "-", "a")
        assert code(e) == "NOT_FOUND"
        assert await scan_prefix(s.db, keys.attempts_prefix("-", "a")) == []
        assert await expiry_rows(s) == []
        assert (s.total_jobs, s.completed_jobs) == (0, 0)
        assert not any(s.tenant_status.values())
    run(t)


def test_failed_and_cancelled_use_the_terminal_ttl():
    async def t(s, clock):
        await finish(s, clock, "f", how="fail")
        await add(s, "c", start_at_ms=T0 + 10**9)
        await cancel.cancel_job(s, "-", "c")
        await add(s, "live")
        clock.t += OK_TTL
        assert await expire_due(s) == 0
        clock.t += END_TTL - OK_TTL
        assert await expire_due(s) == 2
        assert not await exists(s, "f") and not await exists(s, "c") and await exists(s, "live")
        assert (s.total_jobs, s.completed_jobs) == (1, 0)
        assert {k: v for k, v in s.tenant_status.items() if v} == {("-", "Scheduled"): 1}
    run(t)


def test_off_by_default_nothing_expires_and_no_rows_are_written():
    async def t(s, clock):
        await finish(s, clock, "a")
        clock.t += 10**9
        assert await expire_due(s) == 0 and await exists(s, "a")
        assert await expiry_rows(s) == []
    run(t, completed=0, terminal=0)


def test_a_job_restarted_before_its_expiry_is_not_deleted():
    async def t(s, clock):
        await finish(s, clock, "a", how="fail")
        clock.t += 100
        await restart.restart_job(s, "-", "a")
        clock.t += END_TTL
        assert await expire_due(s) == 0 and await exists(s, "a")  # Scheduled again
        assert await expiry_rows(s) == []  # the stale row is gone
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Success(b""))
        ended = clock.t
        assert await expiry_rows(s) == [(ended + OK_TTL, "-", "a")]
        clock.t = ended + OK_TTL
        assert await expire_due(s) == 1 and not await exists(s, "a")
    run(t)


def test_a_job_re_imported_before_its_expiry_waits_for_its_new_time():
    async def t(s, clock):
        first = import_.ImportedAttempt(ATTEMPT_FAILED, T0 - 2, T0 - 1)
        later = import_.ImportedAttempt(ATTEMPT_FAILED, T0 + 3000, T0 + 4000)

        def job(*attempts):
            return import_.ImportJob("a", 50, 0, 0, None, b"", [], {}, "g", list(attempts))
        [r] = await import_.import_jobs(s, "-", [job(first)])
        assert r.status == FAILED
        [r] = await import_.import_jobs(s, "-", [job(first, later)])
        assert r.status == FAILED
        clock.t = T0 - 1 + END_TTL
        assert await expire_due(s) == 0 and await exists(s, "a")
        assert await expiry_rows(s) == [(T0 + 4000 + END_TTL, "-", "a")]
        clock.t = T0 + 4000 + END_TTL
        assert await expire_due(s) == 1 and not await exists(s, "a")
    run(t)


def test_a_longer_ttl_moves_the_row_and_an_old_import_expires_at_once():
    async def t(s, clock):
        await finish(s, clock, "a")
        s.config.completed_job_expire_ms = 3 * OK_TTL  # as if restarted with a new value
        clock.t += OK_TTL
        assert await expire_due(s) == 0
        assert await expiry_rows(s) == [(T0 + 3 * OK_TTL, "-", "a")]
        done = import_.ImportedAttempt(1, T0 - 10**7, T0 - 10**7 + 1)
        [r] = await import_.import_jobs(s, "-", [import_.ImportJob(
            "old", 50, 0, 0, None, b"", [], {}, "g", [done])])
        assert r.status == SUCCEEDED
        assert await expire_due(s) == 1 and not await exists(s, "old") and await exists(s, "a")
    run(t)


def test_the_sweep_reads_only_due_rows():
    async def t(s, clock):
        for i in range(50):
            await add(s, f"live-{i}")
        await finish(s, clock, "done")
        await s.committer.commit()
        assert await due_rows(s, clock.t) == []
        assert len(await due_rows(s, clock.t + OK_TTL)) == 1
        assert s.scheduled_jobs == 50
    run(t)


def test_readers_racing_the_sweeper_see_the_whole_job_or_not_found():
    async def t(s, clock):
        for i in range(40):
            await finish(s, clock, f"j{i}")
        clock.t += OK_TTL

        async def read(job_id):
            try:
                v = await get_job.get_job(s, "-", job_id, True)
            except SiloError as e:
                return code_of(e)
            assert v.status.kind == SUCCEEDED and v.result == b"\xa1r" and len(v.attempts) == 1
            return "ok"
        seen = await asyncio.gather(expire_due(s), *(read(f"j{i}") for i in range(40)))
        assert seen[0] == 40 and set(seen[1:]) <= {"ok", "NOT_FOUND"}
        assert [await read(f"j{i}") for i in range(40)] == ["NOT_FOUND"] * 40
        assert s.total_jobs == 0 and not any(s.tenant_status.values())
    run(t)


def test_jobs_finished_while_retention_was_off_get_indexed_when_it_is_turned_on(tmp_path):
    url = (tmp_path / "store").as_uri()
    sid = str(uuid.uuid4())

    async def open_(clock, ttl):
        return await Shard.open(sid, "", "", url, ShardConfig(
            commit_interval_ms=0, flush_interval_ms=1, completed_job_expire_ms=ttl,
            terminal_job_expire_ms=ttl), clock)

    async def main():
        clock = Clock()
        s = await open_(clock, 0)
        await finish(s, clock, "old")
        assert await expire_due(s) == 0 and await expiry_rows(s) == []
        await s.close()
        s = await open_(clock, OK_TTL)  # retention turned on: "old" gets its row
        await finish(s, clock, "new")
        clock.t += OK_TTL
        assert await expire_due(s) == 2
        assert not await exists(s, "old") and not await exists(s, "new")
        assert await s.db.get(keys.shard_meta("expiry_indexed")) is not None
        await finish(s, clock, "kept")
        await s.close()
        s = await open_(clock, 0)  # off again: the flag goes, so a later "on" re-indexes
        assert await expire_due(s) == 0
        assert await s.db.get(keys.shard_meta("expiry_indexed")) is None
        await s.close()
    asyncio.run(main())
