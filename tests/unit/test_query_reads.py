"""What an indexed query reads from storage (keys counted by silo.query.ranges), and
that LIMIT pushed into an index read returns exactly what a full read would."""

from __future__ import annotations

import pytest

from silo.query import plan as query_plan
from silo.query import ranges
from silo.query.engine import query_shard
from silo.shard import enqueue as enq
from silo.shard import lease, outcome
from silo.shard.state import Shard
from silo.storage.records import JobInfo
from tests.unit.test_shard import T0, Clock, run_populated

N = 600  # jobs in tenant "t"; 60 of them Failed at distinct (and some equal) times
T = "t"


async def _populate(s: Shard, clock: Clock) -> None:
    for i in range(N):
        group = "fail" if i < 60 else "g"
        enq._stage(s, JobInfo(f"j{i:04d}", T, i % 100, 0, b"\x80", None,
                              {"user": f"u{i}", "batch": f"b{i:04d}"}, [], group))
    enq._stage(s, JobInfo("other-1", "o", 1, 0, b"\x80", None, {"batch": "b0001"}, [], "g"))
    await s.committer.commit()
    for k in range(6):  # six waves of ten failures; each wave at its own time
        clock.t = T0 + 1000 * (k + 1)
        for lt in await lease.lease_tasks(s, "w", 10, "fail"):
            await outcome.report_outcome(s, lt.lease.task.task_id, outcome.Failure("E", b""))


def _run(body):
    return run_populated(_populate, body)


async def _reads(s: Shard, sql: str) -> tuple[int, list[dict]]:
    with ranges.count_reads() as n:
        rows = (await query_shard(s, sql, [])).to_pylist()
    return n[0], rows


W = f"SELECT id FROM jobs WHERE tenant = '{T}' AND "


@pytest.mark.parametrize(("sql", "expect_rows", "max_reads"), [
    (W + "starts_with(array_any_value(element_at(metadata, 'batch')), 'b001')", 10, 40),
    (W + "array_any_value(element_at(metadata, 'batch')) LIKE 'b001%'", 10, 40),
    (W + "element_at(metadata, 'batch')[1] LIKE 'b050%'", 10, 40),
    (W + "array_contains(element_at(metadata, 'user'), 'u42')", 1, 5),
    (W + "id = 'j0042'", 1, 3),
    (W + "status_kind = 'Failed'", 60, 200),
    (W + "status_kind = 'Waiting' LIMIT 5", 5, 20),
    (W + "status_kind = 'Failed' ORDER BY status_changed_at_ms DESC LIMIT 3", 3, 40),
    (f"SELECT * FROM jobs WHERE tenant = '{T}' LIMIT 7", 7, 20),
])
def test_indexed_shapes_read_only_what_they_return(sql, expect_rows, max_reads):
    async def body(s, clock):
        n, rows = await _reads(s, sql)
        assert len(rows) == expect_rows, sql
        assert n <= max_reads, f"{sql}: read {n} keys"
        full, _ = await _reads(s, W + "priority >= 0")  # nothing narrows: the tenant
        assert full >= N  # the counter does see a whole-tenant read
    _run(body)


ORDERED = [
    "status_kind = 'Failed' ORDER BY status_changed_at_ms DESC LIMIT 15",
    "status_kind = 'Failed' ORDER BY status_changed_at_ms DESC, id DESC LIMIT 15",
    "status_kind = 'Failed' ORDER BY status_changed_at_ms DESC, id LIMIT 12 OFFSET 5",
    "status_kind IN ('Failed', 'Running') ORDER BY status_changed_at_ms DESC, id LIMIT 4",
    # every Waiting job is due at the same time: all tied, all read (and still right)
    "status_kind = 'Waiting' ORDER BY next_attempt_starts_after_ms DESC, id LIMIT 9",
]


@pytest.mark.parametrize("where", ORDERED)
def test_limit_pushdown_returns_what_a_full_read_returns(where, monkeypatch):
    """Ties on the sort column (ten failures per time) are read in full, so any tie
    breaker of the statement still sees every candidate."""
    async def body(s, clock):
        sql = f"SELECT id, status_changed_at_ms FROM jobs WHERE tenant = '{T}' AND {where}"
        pushed_reads, pushed = await _reads(s, sql)
        real = query_plan.scans_of

        def without_limits(p):
            out = real(p)
            for sc in out:
                sc.limit = None
            return out

        monkeypatch.setattr("silo.query.engine.scans_of", without_limits)
        full_reads, full = await _reads(s, sql)
        assert pushed == full
        assert pushed_reads < full_reads or "Waiting" in where
    _run(body)


def test_limit_is_not_pushed_when_a_filter_is_not_an_index_predicate():
    async def body(s, clock):
        n, rows = await _reads(s, W + "status_kind = 'Failed' AND priority = 59 LIMIT 1")
        assert [r["id"] for r in rows] == ["j0059"]
        n, rows = await _reads(s, W + "status_kind = 'Failed' ORDER BY priority DESC LIMIT 1")
        assert [r["id"] for r in rows] == ["j0059"]
    _run(body)


# The column types of upstream's table scanners (gadget-inc/silo src/query.rs), as the
# Arrow type names the Query response carries.
UPSTREAM_TYPES = {
    "jobs": "shard_id Utf8, tenant Utf8, id Utf8, priority UInt8, enqueue_time_ms Int64, "
            "payload Utf8, status_kind Utf8, status_changed_at_ms Int64, task_group Utf8, "
            "current_attempt UInt32, next_attempt_starts_after_ms Int64, "
            "metadata Map(Utf8, Utf8), limits Utf8",
    "tasks": "shard_id Utf8, tenant Utf8, task_group Utf8, start_time_ms Int64, "
             "priority UInt8, job_id Utf8, attempt UInt32, variant_type Utf8, task_id Utf8, "
             "held_queues Utf8",
    "queues": "shard_id Utf8, tenant Utf8, queue_name Utf8, entry_type Utf8, task_id Utf8, "
              "job_id Utf8, priority UInt8, timestamp_ms Int64",
    "tenant_counts": "shard_id Utf8, tenant Utf8, status_kind Utf8, cnt Int64",
    "queue_counts": "shard_id Utf8, tenant Utf8, queue_name Utf8, holders Int64, "
                    "requesters Int64, max_concurrency Int64, limit_type Utf8",
}


def test_column_types_are_upstreams():
    from silo.query import wire
    from silo.query.schema import TABLES

    for name, spec in UPSTREAM_TYPES.items():
        got = ", ".join(f"{c} {t}" for c, t in wire.columns(TABLES[name]))
        assert got.replace("Map<", "Map(").replace(">", ")") == spec, name
