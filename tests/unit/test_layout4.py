"""Layout 4 (silo.storage.keys): a RunAttempt's lease is the value of its job's Running
status-index row, and the job counters are one row per tenant plus one per shard.

The state machine must behave exactly as with the 0x06 lease rows and the per-(tenant,
status) counters, and a data dir written by the code before (tests/fixtures/layout3,
see make_layout3.py) must open with the same jobs, leases and counts.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from pathlib import Path

import msgspec

from silo.shard import cancel, counters, get_job, lease, outcome
from silo.shard.reaper import reap_expired_leases
from silo.shard.state import Shard, ShardConfig
from silo.storage import keys
from silo.storage.records import (
    CANCELLED,
    FAILED,
    RUNNING,
    SCHEDULED,
    SUCCEEDED,
    encode,
    encode_i64,
    lease_decoder,
)
from tests.unit.test_shard import T0, Clock, add, run

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "layout3"
_counts = msgspec.msgpack.Decoder(list[int])


async def rows(s: Shard, kind: int) -> list[tuple[bytes, bytes]]:
    return await s.committer.scan_prefix(keys.kind_prefix(kind))


async def running_rows(s: Shard, tenant: str = "-") -> list[tuple[bytes, bytes]]:
    return await s.committer.scan_prefix(keys.status_index_prefix(tenant, "Running"))


async def stored_counts(s: Shard) -> dict[tuple[str, str], int]:
    out = {}
    for k, v in await rows(s, keys.TENANT_COUNTS):
        tenant, _ = keys.dec_str(k, 1)
        for name, n in zip(counters.NAMES, _counts.decode(v), strict=False):
            if n:
                out[(tenant, name)] = n
    return out


def live_counts(s: Shard) -> dict[tuple[str, str], int]:
    return {k: n for k, n in s.tenant_status.items() if n}


def test_a_running_jobs_lease_lives_in_its_running_index_row():
    async def t(s, clock):
        jid = await add(s)
        [lt] = await lease.lease_tasks(s, "w", 1, "g")
        tid = lt.lease.task.task_id
        assert await rows(s, keys.LEASE) == []
        [(k, v)] = await running_rows(s)
        assert keys.decode_status_index(k)[3] == jid
        assert lease_decoder.decode(v) == s.leases[tid]
        clock.t += 500
        await outcome.heartbeat(s, "w", tid)
        [(_, v)] = await running_rows(s)
        assert lease_decoder.decode(v).expiry_ms == T0 + 500 + s.config.lease_ms
        assert await rows(s, keys.LEASE) == []
        await outcome.report_outcome(s, tid, outcome.Success(b"\xc0"))
        assert await running_rows(s) == [] and await rows(s, keys.LEASE) == []
        assert (await get_job.get_job(s, "-", jid, True)).status.kind == SUCCEEDED
    run(t)


def test_every_end_of_a_lease_removes_its_row():
    """Failure with a retry, give back, the reaper and cancel-then-report: no Running
    row (and so no lease) is left behind."""
    from silo.shard.give_back import give_back
    from tests.unit.test_shard import RETRY

    async def t(s, clock):
        for _ in range(4):
            await add(s, retry=RETRY)
        got = await lease.lease_tasks(s, "w", 4, "g")
        a, b, c, d = (x.lease.task for x in got)
        await outcome.report_outcome(s, a.task_id, outcome.Failure("E", b""))
        await give_back(s, "w", b.task_id)
        await cancel.cancel_job(s, "-", c.job_id)
        await outcome.report_outcome(s, c.task_id, outcome.Failure("E", b""))
        clock.t += s.config.lease_ms + 1
        assert await reap_expired_leases(s) == 1  # d
        assert await running_rows(s) == [] and await rows(s, keys.LEASE) == []
        assert s.leases == {} and s.tenant_status[("-", "Running")] == 0
    run(t)


def test_leases_come_back_from_the_running_rows_at_open(tmp_path):
    url = f"file://{tmp_path}/objects"
    sid = str(uuid.uuid4())

    async def before(s, clock):
        for i in range(3):
            await add(s, f"j{i}")
        got = await lease.lease_tasks(s, "w", 3, "g")
        clock.t += 100
        await outcome.heartbeat(s, "w", got[1].lease.task.task_id)
        await cancel.cancel_job(s, "-", "j2")
        return {x.lease.task.job_id: s.leases[x.lease.task.task_id] for x in got}

    leases = run(before, url, sid)

    async def after(s, clock):
        assert {ls.task.task_id: ls for ls in leases.values()} == s.leases
        assert s.active[("-", "j2")].cancelled_at_ms == T0 + 100
        assert s.active[("-", "j0")].cancelled_at_ms is None
        await outcome.report_outcome(s, leases["j0"].task.task_id, outcome.Success(b""))
        clock.t += 2 * s.config.lease_ms
        assert await reap_expired_leases(s) == 2
        kinds = [(await get_job.get_job(s, "-", f"j{i}", True)).status.kind for i in range(3)]
        assert kinds == [SUCCEEDED, FAILED, CANCELLED]
        assert await running_rows(s) == []
    run(after, url, sid)


def test_counters_are_one_row_per_tenant_and_survive_reopen(tmp_path):
    url = f"file://{tmp_path}/objects"
    sid = str(uuid.uuid4())

    async def before(s, clock):
        for t in ("a", "b"):
            for _ in range(3):
                await add(s, tenant=t)
        [x, _y] = await lease.lease_tasks(s, "w", 2, "g")
        await outcome.report_outcome(s, x.lease.task.task_id, outcome.Success(b""))
        assert await rows(s, keys.TENANT_STATUS_COUNTER) == []
        assert await stored_counts(s) == live_counts(s)
        assert sum(live_counts(s).values()) == 6
        [(_, v)] = [r for r in await rows(s, keys.SHARD_COUNTER)
                    if r[0] == keys.shard_counter(counters.JOBS)]
        assert _counts.decode(v) == [6, 1]
        return live_counts(s)

    want = run(before, url, sid)

    async def after(s, clock):
        assert live_counts(s) == want and (s.total_jobs, s.completed_jobs) == (6, 1)
        assert s.scheduled_jobs == 4
    run(after, url, sid)


def _to_layout3(s: Shard) -> None:
    """Rewrite what layout 4 stores differently as the code before wrote it: leases in
    0x06 rows (the Running rows empty), counters per (tenant, status) and as
    total_jobs / completed_jobs."""
    c = s.committer
    for ls in s.leases.values():
        c.put(keys.lease(ls.task.task_id), encode(ls))
        job = s.active[(ls.task.tenant, ls.task.job_id)]
        c.put(job.index_key, b"")
    for (t, name), n in s.tenant_status.items():
        if n:
            c.put(keys.tenant_status_counter(t, name), encode_i64(n))
        c.delete(keys.tenant_counts(t))
    c.put(keys.shard_counter("total_jobs"), encode_i64(s.total_jobs))
    c.put(keys.shard_counter("completed_jobs"), encode_i64(s.completed_jobs))
    c.delete(keys.shard_counter(counters.JOBS))


def test_rows_of_the_older_layout_are_read_then_replaced(tmp_path):
    url = f"file://{tmp_path}/objects"
    sid = str(uuid.uuid4())

    async def before(s, clock):
        for t in ("a", "b"):
            for _ in range(2):
                await add(s, tenant=t)
        got = await lease.lease_tasks(s, "w", 3, "g")
        s.committer._on_seal = None  # write the old rows as they are
        _to_layout3(s)
        await s.committer.commit()
        assert len(await rows(s, keys.LEASE)) == 3
        return live_counts(s), {x.lease.task.task_id for x in got}

    want, tids = run(before, url, sid)

    async def after(s, clock):
        assert live_counts(s) == want and (s.total_jobs, s.completed_jobs) == (4, 0)
        assert set(s.leases) == tids == s.lease_rows
        first = sorted(tids)[0]
        clock.t += 10
        await outcome.heartbeat(s, "w", first)  # an old lease stays in its 0x06 row
        assert len(await rows(s, keys.LEASE)) == 3
        await outcome.report_outcome(s, first, outcome.Success(b""))
        assert len(await rows(s, keys.LEASE)) == 2
        # The first batch replaced the old counter rows.
        assert await rows(s, keys.TENANT_STATUS_COUNTER) == []
        names = {keys.dec_str(k, 1)[0] for k, _ in await rows(s, keys.SHARD_COUNTER)}
        assert names & {"total_jobs", "completed_jobs"} == set()
        assert await stored_counts(s) == live_counts(s)
        clock.t += 2 * s.config.lease_ms
        assert await reap_expired_leases(s) == 2
        assert await rows(s, keys.LEASE) == []
        assert s.tenant_status[("a", "Running")] + s.tenant_status[("b", "Running")] == 0
    run(after, url, sid)


def _fixture_expected() -> dict:
    return json.loads((FIXTURE / "expected.json").read_text())


def _open_fixture(tmp_path: Path, shard_id: str, clock: Clock):
    return Shard.open(shard_id, "", "", f"file://{tmp_path}/objects",
                      ShardConfig(commit_interval_ms=0, flush_interval_ms=1), clock)


def test_a_layout3_data_dir_opens_with_the_same_jobs_leases_and_counts(tmp_path):
    shutil.copytree(FIXTURE / "objects", tmp_path / "objects")
    exp = _fixture_expected()
    now = max(j["status_changed_at_ms"] for j in exp["jobs"].values()) + 1000

    async def main():
        for sid, (total, completed) in exp["shards"].items():
            clock = Clock()
            clock.t = now
            s = await _open_fixture(tmp_path, sid, clock)
            try:
                await _check_shard(s, clock, exp, total, completed)
            finally:
                await s.close()
            s = await _open_fixture(tmp_path, sid, clock)  # once more, all layout 4 now
            try:
                assert await rows(s, keys.TENANT_STATUS_COUNTER) == []
                assert await stored_counts(s) == live_counts(s)
                assert s.leases == {} and await rows(s, keys.LEASE) == []
            finally:
                await s.close()

    asyncio.run(main())


async def _check_shard(s: Shard, clock: Clock, exp: dict, total: int, completed: int):
    from silo.shard.indexes import layout_version

    assert await layout_version(s) == keys.LAYOUT_VERSION == 4
    assert (s.total_jobs, s.completed_jobs) == (total, completed)
    tenants = {t for t, _ in s.tenant_status}
    assert tenants and tenants <= set(exp["tenants"])
    for t in tenants:
        assert {n: c for (tt, n), c in live_counts(s).items() if tt == t} == (
            exp["tenant_counts"][t])
    jobs = {j: e for j, e in exp["jobs"].items() if e["tenant"] in tenants}
    for job_id, e in jobs.items():
        v = await get_job.get_job(s, e["tenant"], job_id, True)
        assert v.status.kind == e["status"], job_id
        assert v.status.changed_at_ms == e["status_changed_at_ms"], job_id
        assert v.status.next_attempt_starts_after_ms == e["next"], job_id
        assert [[a.attempt, a.status, a.error_code or ""] for a in v.attempts] == (
            e["attempts"]), job_id
    mine = {j: ls for j, ls in exp["leases"].items() if ls["tenant"] in tenants}
    assert {ls["task_id"] for ls in mine.values()} == set(s.leases)
    for job_id, ls in mine.items():
        job = s.active[(ls["tenant"], job_id)]
        assert job.kind == RUNNING and job.task_id == ls["task_id"]
        assert (job.cancelled_at_ms is not None) == job_id.endswith("cancel-running")
    # The old leases end as they would have: reported, or reaped (cancel flag kept).
    for job_id, ls in mine.items():
        if job_id.endswith("-running") and not job_id.endswith("cancel-running"):
            await outcome.report_outcome(s, ls["task_id"], outcome.Success(b""))
    clock.t += 4 * 3_600_000
    assert await reap_expired_leases(s) == len(mine) // 3 * 2
    for job_id, ls in mine.items():
        kind = (await get_job.get_job(s, ls["tenant"], job_id, True)).status.kind
        assert kind == {"running": SUCCEEDED, "hb": FAILED, "cancel-running": CANCELLED}[
            job_id.split("-", 2)[2]], job_id
    assert s.leases == {} and await rows(s, keys.LEASE) == []
    assert all(n == 0 for (_, name), n in s.tenant_status.items() if name == "Running")
    assert s.tenant_status[(sorted(tenants)[0], "Scheduled")] == 3
    assert await stored_counts(s) == live_counts(s)
    assert SCHEDULED == 0  # the fixture's expected.json uses the wire numbers
