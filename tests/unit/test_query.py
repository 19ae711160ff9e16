"""SQL over one shard (behaviour.md §7): the documented example queries verbatim on known
data, every status word, parameters, pushdown through the indexes, and errors."""

from __future__ import annotations

import logging

import grpc
import pyarrow as pa
import pytest

from silo.errors import SiloError
from silo.observability import metrics
from silo.query import engine, ranges, scan, settings
from silo.query.engine import query_shard
from silo.shard import cancel, lease, outcome
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import ConcurrencyLimit, RetryPolicy
from tests.unit.test_shard import T0, Clock, add, run_populated

RETRY = RetryPolicy(retry_count=3, initial_interval_ms=60_000, max_interval_ms=60_000,
                    randomize_interval=False, backoff_factor=1.0)


async def populate(s: Shard, clock: Clock) -> None:
    a = "acme"
    await add(s, "job-1", tenant=a, priority=10, payload=b"\x81\xa1n\x01",
              metadata={"user_id": "user-123", "region": "us-east-1"})
    await add(s, "job-2", tenant=a, priority=20, retry=RETRY, metadata={"region": "eu-west-1"})
    [t1, t2] = await lease.lease_tasks(s, "w", 2, "g")
    await outcome.report_outcome(s, t2.lease.task.task_id, outcome.Failure("E", b""))  # retry
    await add(s, "job-3", tenant=a, priority=30, start_at_ms=T0 + 3_600_000, group="other")
    await add(s, "job-4", tenant=a, priority=40, metadata={"region": "us-west-2"})
    await add(s, "job-5", tenant=a, priority=50)
    await add(s, "job-6", tenant=a, priority=60)
    await add(s, "job-7", tenant=a, priority=70, group="g7")
    got = {t.lease.task.job_id: t for t in await lease.lease_tasks(s, "w", 10, "g")}
    await outcome.report_outcome(s, got["job-5"].lease.task.task_id, outcome.Failure("E", b""))
    await outcome.report_outcome(s, got["job-6"].lease.task.task_id, outcome.Cancelled())
    [t7] = await lease.lease_tasks(s, "w", 1, "g7")
    await outcome.report_outcome(s, t7.lease.task.task_id, outcome.Success(b"\xc0"))
    # job-4 was leased above too: put a fresh due one back as Waiting.
    await add(s, "job-8", tenant=a, priority=5, group="q", limits=[ConcurrencyLimit("q1", 1)])
    await add(s, "job-9", tenant=a, priority=5, group="q", limits=[ConcurrencyLimit("q1", 1)])
    await add(s, "job-10", tenant=a, priority=1, group="idle")
    await add(s, "o-1", tenant="other", priority=99, metadata={"user_id": "user-123"})
    await cancel.cancel_job(s, "other", "o-1")
    assert t1.lease.task.job_id == "job-1"


def run_with_data(body):
    return run_populated(populate, body)


async def q(s, sql, *params) -> list[dict]:
    return (await query_shard(s, sql, list(params))).to_pylist()


def ids(rows) -> list[str]:
    return sorted(r["id"] for r in rows)


def test_documented_example_queries_verbatim():
    async def body(s, clock):
        rows = await q(s, "SELECT * FROM jobs WHERE tenant = 'acme' "
                          "ORDER BY enqueue_time_ms DESC LIMIT 50")
        assert len(rows) == 10 and {r["tenant"] for r in rows} == {"acme"}
        assert list(rows[0]) == ["shard_id", "tenant", "id", "priority", "enqueue_time_ms",
                                 "payload", "status_kind", "status_changed_at_ms",
                                 "task_group", "current_attempt",
                                 "next_attempt_starts_after_ms", "metadata", "limits"]
        one = await q(s, "SELECT * FROM jobs WHERE tenant = 'acme' AND id = 'job-1'")
        assert one[0]["payload"] == '{"n":1}' and one[0]["status_kind"] == "Running"
        assert dict(one[0]["metadata"]) == {"user_id": "user-123", "region": "us-east-1"}
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "status_kind = 'Running'")) == ["job-1", "job-4"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "status_kind = 'Failed'")) == ["job-5"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "status_kind = 'Waiting'")) == ["job-10", "job-8", "job-9"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "status_kind = 'Scheduled'")) == ["job-2", "job-3"]
        retrying = await q(s, "SELECT id, current_attempt FROM jobs WHERE tenant = 'acme' "
                              "AND current_attempt > 1")
        assert retrying == [{"id": "job-2", "current_attempt": 2}]
        by_status = await q(s, "SELECT status_kind, COUNT(*) as count FROM jobs "
                               "WHERE tenant = 'acme' GROUP BY status_kind "
                               "ORDER BY status_kind")
        assert {r["status_kind"]: r["count"] for r in by_status} == {
            "Cancelled": 1, "Failed": 1, "Running": 2, "Scheduled": 2, "Succeeded": 1,
            "Waiting": 3}
        grouped = await q(s, "SELECT task_group, status_kind, COUNT(*) as count FROM jobs "
                             "WHERE tenant = 'acme' GROUP BY task_group, status_kind")
        assert {(r["task_group"], r["status_kind"]): r["count"] for r in grouped}[
            ("q", "Waiting")] == 2
        [avg] = await q(s, "SELECT AVG(CAST(priority AS DOUBLE)) as avg_priority FROM jobs "
                           "WHERE tenant = 'acme'")
        assert avg["avg_priority"] == pytest.approx((10 + 20 + 30 + 40 + 50 + 60 + 70 + 5 + 5
                                                     + 1) / 10)
        counts = await q(s, "SELECT * FROM tenant_counts WHERE tenant = 'acme'")
        assert {r["status_kind"]: r["cnt"] for r in counts}["Scheduled"] == 5
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "array_contains(element_at(metadata, 'user_id'), 'user-123')")
                   ) == ["job-1"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND starts_with("
                              "array_any_value(element_at(metadata, 'region')), 'us-')")
                   ) == ["job-1", "job-4"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "array_any_value(element_at(metadata, 'region')) LIKE 'eu-%'")
                   ) == ["job-2"]
        queues = await q(s, "SELECT queue_name, entry_type, COUNT(*) as count FROM queues "
                            "WHERE tenant = 'acme' GROUP BY queue_name, entry_type")
        assert {(r["queue_name"], r["entry_type"]): r["count"] for r in queues} == {
            ("q1", "holder"): 1, ("q1", "requester"): 1}
        tasks = await q(s, "SELECT task_group, variant_type, COUNT(*) as count FROM tasks "
                           "GROUP BY task_group, variant_type")
        assert {(r["task_group"], r["variant_type"]): r["count"] for r in tasks} == {
            ("g", "RunAttempt"): 1, ("other", "RunAttempt"): 1, ("q", "RunAttempt"): 1,
            ("idle", "RunAttempt"): 1}
        [qc] = await q(s, "SELECT * FROM queue_counts WHERE tenant = 'acme'")
        assert (qc["queue_name"], qc["holders"], qc["requesters"]) == ("q1", 1, 1)
        assert (await q(s, "SELECT COUNT(*) as count FROM jobs WHERE tenant = 'acme'")
                ) == [{"count": 10}]
    run_with_data(body)


@pytest.mark.parametrize(("word", "expected"), [
    ("Waiting", ["job-10", "job-8", "job-9"]), ("waiting", ["job-10", "job-8", "job-9"]),
    ("Scheduled", ["job-2", "job-3"]), ("scheduled", ["job-2", "job-3"]),
    ("Running", ["job-1", "job-4"]), ("running", ["job-1", "job-4"]),
    ("Failed", ["job-5"]), ("failed", ["job-5"]),
    ("Cancelled", ["job-6"]), ("cancelled", ["job-6"]), ("canceled", ["job-6"]),
    ("Succeeded", ["job-7"]), ("succeeded", ["job-7"]), ("success", ["job-7"]),
])
def test_each_status_word_literal_and_parameter(word, expected):
    async def body(s, clock):
        assert ids(await q(s, f"SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              f"status_kind = '{word}'")) == expected
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = $1 AND status_kind = $2",
                           "acme", word)) == expected
    run_with_data(body)


def test_status_in_and_or_lists_are_unioned():
    async def body(s, clock):
        want = ["job-5", "job-6", "job-7"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND status_kind IN "
                              "('Failed', 'canceled', 'success')")) == want
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND (status_kind = "
                              "'Failed' OR status_kind = 'Cancelled' OR status_kind = "
                              "'Succeeded')")) == want
    run_with_data(body)


def test_every_parameter_type_binds():
    async def body(s, clock):
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = $1 AND priority = $2",
                           "acme", 40)) == ["job-4"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND priority = $1",
                           pa.scalar(40, pa.uint64()))) == ["job-4"]
        assert ids(await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                              "CAST(priority AS DOUBLE) > $1", 69.5)) == ["job-7"]
        [r] = await q(s, "SELECT $1 AS b, $2 AS x, $3 AS n", True, b"\x01\x02", None)
        assert r == {"b": True, "x": b"\x01\x02", "n": None}
    run_with_data(body)


def test_indexed_queries_never_scan_the_tenants_jobs(monkeypatch):
    read: list[bytes] = []
    real = ranges.rows

    def spy(db, start, end, *a):
        read.append(start)
        return real(db, start, end, *a)

    monkeypatch.setattr(scan, "_rows", spy)
    monkeypatch.setattr(ranges, "rows", spy)
    full = {keys.kind_prefix(keys.JOB_INFO) + keys.enc_str("acme"),
            keys.kind_prefix(keys.JOB_STATUS) + keys.enc_str("acme")}

    async def body(s, clock):
        for sql in [
            "SELECT * FROM jobs WHERE tenant = 'acme' AND id = 'job-1'",
            "SELECT * FROM jobs WHERE id = 'job-1'",
            "SELECT * FROM jobs WHERE tenant = 'acme' AND status_kind IN ('Failed', 'waiting')",
            "SELECT id FROM jobs WHERE tenant = 'acme' AND "
            "array_contains(element_at(metadata, 'user_id'), 'user-123')",
            "SELECT id FROM jobs WHERE tenant = 'acme' AND "
            "array_any_value(element_at(metadata, 'region')) LIKE 'us-%'",
            "SELECT COUNT(*) FROM jobs WHERE tenant = 'acme'",
            "SELECT status_kind, COUNT(*) FROM jobs WHERE tenant = 'acme' GROUP BY status_kind",
        ]:
            read.clear()
            await q(s, sql)
            assert not (set(read) & full), sql
        read.clear()
        await q(s, "SELECT id FROM jobs WHERE tenant = 'acme' AND priority = 5")
        assert set(read) & full  # nothing narrows: a scan of the tenant
    run_with_data(body)


def test_count_from_counters_can_be_turned_off(monkeypatch):
    group = ("SELECT tenant, status_kind, COUNT(*) AS n FROM jobs GROUP BY tenant, "
             "status_kind ORDER BY tenant, status_kind")
    waiting = "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' AND status_kind = 'waiting'"

    async def body(s, clock):
        from_counters = (await q(s, group), await q(s, waiting))
        assert from_counters[1] == [{"n": 3}]
        monkeypatch.setattr(settings, "SETTINGS",
                            settings.QuerySettings(count_from_status_counters=False))
        assert (await q(s, group), await q(s, waiting)) == from_counters
        monkeypatch.setattr(settings, "SETTINGS",
                            settings.QuerySettings(count_from_status_counters=False))
        assert await q(s, "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme'") == [{"n": 10}]
        assert await q(s, "SELECT COUNT(*) AS n FROM jobs") == [{"n": 11}]
    run_with_data(body)


@pytest.mark.parametrize(("sql", "code", "text"), [
    ("SELEC 1", grpc.StatusCode.INVALID_ARGUMENT, "SQL error: ParserError"),
    ("SELECT nope FROM jobs", grpc.StatusCode.INVALID_ARGUMENT, "No field named nope"),
    ("SELECT * FROM nope", grpc.StatusCode.INVALID_ARGUMENT, "not found"),
    ("DROP TABLE jobs", grpc.StatusCode.INVALID_ARGUMENT, "DDL not supported"),
    ("CREATE TABLE x AS SELECT 1", grpc.StatusCode.INVALID_ARGUMENT, "DDL not supported"),
    ("INSERT INTO jobs (id) VALUES ('x')", grpc.StatusCode.INVALID_ARGUMENT,
     "DML not supported"),
    ("DELETE FROM jobs", grpc.StatusCode.INVALID_ARGUMENT, "DML not supported"),
    ("COPY jobs TO '/tmp/x.csv'", grpc.StatusCode.INVALID_ARGUMENT, "not supported"),
    ("SELECT 1; SELECT 2", grpc.StatusCode.INVALID_ARGUMENT, "single SQL statement"),
    ("SET datafusion.execution.batch_size = 5", grpc.StatusCode.INVALID_ARGUMENT,
     "not supported"),
    ("SELECT $1", grpc.StatusCode.INVALID_ARGUMENT, "SQL parameter error"),
    ("", grpc.StatusCode.INVALID_ARGUMENT, "SQL error"),
])
def test_errors(sql, code, text):
    async def body(s, clock):
        with pytest.raises(SiloError) as e:
            await q(s, sql)
        assert e.value.code == code and text in e.value.message
    run_with_data(body)


def test_limits_timeout_size_concurrency_and_slow_log(monkeypatch, caplog):
    async def body(s, clock):
        monkeypatch.setattr(settings, "SETTINGS", settings.QuerySettings(
            max_result_bytes=100, slow_query_log_ms=0))
        table = await query_shard(s, "SELECT * FROM jobs", [])
        with pytest.raises(SiloError) as e:
            engine.check_result_size(table)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_result_bytes" in e.value.message
        monkeypatch.setattr(settings, "SETTINGS", settings.QuerySettings(
            max_concurrent_statements=1))
        with engine.admitted([s.id]), pytest.raises(SiloError) as e:
            await q(s, "SELECT 1")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert metrics.QUERY_REJECTED.pending.get((s.id, "max_concurrent_statements"), 0) >= 1
        assert await q(s, "SELECT 1 AS one") == [{"one": 1}]  # slot given back
        monkeypatch.setattr(settings, "SETTINGS", settings.QuerySettings(
            statement_timeout_ms=1))
        slow = engine.execute

        def sleepy(planned, tables):
            import time  # noqa: PLC0415
            time.sleep(0.2)
            return slow(planned, tables)

        monkeypatch.setattr(engine, "execute", sleepy)
        with pytest.raises(SiloError) as e:
            await q(s, "SELECT 1")
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert metrics.QUERY_CANCELLED.pending.get((s.id, "statement_timeout"), 0) >= 1
        monkeypatch.setattr(settings, "SETTINGS", settings.QuerySettings(slow_query_log_ms=1))
        long_sql = "SELECT 1 AS x " + " " * 600 + "-- end"
        with caplog.at_level(logging.WARNING, logger="silo.query.engine"):
            await q(s, long_sql)
        [rec] = [r for r in caplog.records if "slow SQL" in r.getMessage()]
        assert long_sql[:512] in rec.getMessage() and "-- end" not in rec.getMessage()
    run_with_data(body)
