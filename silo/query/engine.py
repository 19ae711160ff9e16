"""Running one SQL statement over one or more shards with DataFusion.

1. plan: DataFusion parses and plans the statement (read-only SQL options) against
   empty tables, which gives the engine's own error for bad SQL, unknown tables or
   columns, and the TableScans whose filters tell what to read (plan.py);
2. read: each shard's rows for those scans (scan.py, on the shard's event loop,
   in slices); rows of several shards are concatenated per table;
3. execute: DataFusion evaluates the whole statement over the rows read.

Planning and execution take CPU and run in a thread, so the event loop keeps serving
Enqueue/LeaseTasks meanwhile. Admission (per shard), the statement timeout and the
slow-query log wrap the whole. The same pipeline with the per-shard reads gathered
from every shard of the node gives correct cross-shard aggregates (cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
import pyarrow as pa
from datafusion import SessionConfig, SessionContext, SQLOptions

from silo import errors
from silo.errors import SiloError
from silo.observability import metrics
from silo.query import counted, pace
from silo.query import settings as query_settings
from silo.query.plan import Scan, canonicalise_status_literals, scans_of, tables_named
from silo.query.scan import read_table
from silo.query.schema import TABLES

log = logging.getLogger(__name__)

SLOW_SQL_CHARS = 512
_RO = SQLOptions().with_allow_ddl(False).with_allow_dml(False).with_allow_statements(False)
_local = threading.local()
_running: dict[str, int] = {}  # shard id → statements running on it


def _session() -> SessionContext:
    # One partition: the machine's cores belong to the shards' event loops.
    return SessionContext(SessionConfig().with_target_partitions(1))


def _planning_context(weighted: bool = False) -> SessionContext:
    attr = "weighted_ctx" if weighted else "ctx"
    ctx = getattr(_local, attr, None)
    if ctx is None:
        ctx = _session()
        for name, schema in TABLES.items():
            if weighted and name == "jobs":
                schema = counted.WEIGHTED_JOBS
            ctx.register_record_batches(name, [[pa.RecordBatch.from_pylist([], schema=schema)]])
        setattr(_local, attr, ctx)
    return ctx


def _engine_message(e: BaseException) -> str:
    msg = str(e)
    for head in ("DataFusion error: ", "SQL error: "):
        if msg.startswith(head):
            msg = msg[len(head):]
    return msg


def _bind(params: list) -> dict[str, object]:
    return {str(i + 1): v for i, v in enumerate(params)}


def _sql_error(e: BaseException) -> SiloError:
    msg = _engine_message(e)
    if "placeholder" in msg.lower() or "param" in msg.lower():
        return errors.invalid(f"SQL parameter error: {msg}")
    return errors.invalid(f"SQL error: {msg}")


class Planned:
    """A statement ready to read and execute: its scans and the text to evaluate."""

    def __init__(self, sql: str, params: list, scans: list[Scan]) -> None:
        self.sql = sql
        self.params = params
        self.scans = scans
        # Set when the jobs table is read as per-counter rows (counted.py): the text
        # DataFusion evaluates over them, and the output schema the result is cast to.
        self.weighted_sql: str | None = None
        self.schema: pa.Schema | None = None


def plan(sql: str, params: list) -> Planned:
    """Plan against empty tables; raise INVALID_ARGUMENT with the engine's message."""
    if not sql.strip():
        raise errors.invalid("SQL error: empty statement")
    try:
        df = _planning_context().sql(sql, options=_RO, param_values=_bind(params))
        optimized = df.optimized_logical_plan()
        scans = scans_of(optimized)
    except Exception as e:  # noqa: BLE001 - every engine error is the caller's SQL
        raise _sql_error(e) from None
    seen = {s.table for s in scans}
    named = tables_named(sql)
    scans += [Scan(t) for t in sorted(named - seen)]
    literals = set().union(*(s.status_literals for s in scans)) if scans else set()
    sql, params = canonicalise_status_literals(sql, params, literals)
    planned = Planned(sql, params, scans)
    if (query_settings.SETTINGS.count_from_status_counters and named == {"jobs"}
            and len(scans) == 1):
        _try_weighted(planned, optimized, df.schema())
    return planned


def _try_weighted(planned: Planned, optimized, schema: pa.Schema) -> None:
    """Read the jobs table as per-counter rows when the statement only counts (counted.py)."""
    def replan(text: str):
        wdf = _planning_context(weighted=True).sql(text, options=_RO,
                                                   param_values=_bind(planned.params))
        return wdf.optimized_logical_plan(), wdf.schema()

    text = counted.weighted_sql(planned.sql, optimized, schema, replan)
    if text is not None:
        planned.weighted_sql, planned.schema = text, schema
        planned.scans[0].weighted = True


def execute(planned: Planned, tables: dict[str, pa.Table]) -> pa.Table:
    ctx = _session()
    weighted = planned.weighted_sql is not None
    for name, schema in TABLES.items():
        if weighted and name == "jobs":
            schema = counted.WEIGHTED_JOBS
        t = tables.get(name)
        batches = t.to_batches() if t is not None and t.num_rows else []
        ctx.register_record_batches(name, [batches or [pa.RecordBatch.from_pylist([],
                                                                                   schema=schema)]])
    try:
        df = ctx.sql(planned.weighted_sql or planned.sql, options=_RO,
                     param_values=_bind(planned.params))
    except Exception as e:  # noqa: BLE001
        raise _sql_error(e) from None
    try:
        if weighted and planned.schema is not None:
            return counted.conform(df.to_arrow_table(), planned.schema)
        return df.to_arrow_table()
    except Exception as e:  # noqa: BLE001
        if "placeholder" in str(e).lower():
            raise _sql_error(e) from None
        raise SiloError(grpc.StatusCode.INTERNAL,
                        f"Query execution failed: {_engine_message(e)}") from None


def merge_scans(scans: list[Scan]) -> dict[str, list[Scan]]:
    out: dict[str, list[Scan]] = {}
    for s in scans:
        out.setdefault(s.table, []).append(s)
    return out


async def read_shard(shard, planned: Planned, now: int) -> dict[str, pa.Table]:
    """One shard's rows for every scan of the statement (deduplicated per table)."""
    out: dict[str, pa.Table] = {}
    count = query_settings.SETTINGS.count_from_status_counters
    for table, scans in merge_scans(planned.scans).items():
        with pace.paced():
            parts = [await read_table(shard, s, now,
                                      count_from_counters=count and len(scans) == 1)
                     for s in scans]
        t = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1 and table == "jobs":
            t = _dedupe_jobs(t)
        out[table] = t
    return out


def _dedupe_jobs(t: pa.Table) -> pa.Table:
    keys = list(zip(t.column("tenant").to_pylist(), t.column("id").to_pylist(), strict=True))
    first: dict[tuple, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    return t.take(sorted(first.values()))


def concat(per_shard: list[dict[str, pa.Table]]) -> dict[str, pa.Table]:
    out: dict[str, pa.Table] = {}
    for name in TABLES:
        parts = [d[name] for d in per_shard if name in d]
        if parts:
            out[name] = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return out


@contextlib.contextmanager
def admitted(shard_ids: list[str]) -> Iterator[None]:
    """Per-shard admission: more than max_concurrent_statements → RESOURCE_EXHAUSTED."""
    cap = query_settings.SETTINGS.max_concurrent_statements
    if cap > 0:
        for sid in shard_ids:
            if _running.get(sid, 0) >= cap:
                metrics.QUERY_REJECTED.inc((sid, "max_concurrent_statements"))
                raise SiloError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many concurrent SQL statements on shard {sid} "
                                f"(max_concurrent_statements = {cap})")
    for sid in shard_ids:
        _running[sid] = _running.get(sid, 0) + 1
        metrics.QUERY_INFLIGHT.set((sid,), _running[sid])
    try:
        yield
    finally:
        for sid in shard_ids:
            _running[sid] -= 1
            metrics.QUERY_INFLIGHT.set((sid,), _running[sid])
            if not _running[sid]:
                del _running[sid]


async def run_statement(
    shard_ids: list[str],
    sql: str,
    params: list,
    read: Callable[[Planned], Awaitable[list[dict[str, pa.Table]]]],
) -> pa.Table:
    """Plan, read (through `read`), execute, with admission, timeout and slow log."""
    s = query_settings.SETTINGS
    t0 = time.perf_counter()
    with admitted(shard_ids):
        async def pipeline() -> pa.Table:
            planned = await asyncio.to_thread(plan, sql, params)
            tables = concat(await read(planned))
            return await asyncio.to_thread(execute, planned, tables)

        try:
            if s.statement_timeout_ms > 0:
                result = await asyncio.wait_for(pipeline(), s.statement_timeout_ms / 1000)
            else:
                result = await pipeline()
        except TimeoutError:
            for sid in shard_ids:
                metrics.QUERY_CANCELLED.inc((sid, "statement_timeout"))
            raise SiloError(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"SQL statement timed out after {s.statement_timeout_ms} ms "
                            "(statement_timeout_ms)") from None
        finally:
            ms = (time.perf_counter() - t0) * 1000
            if s.slow_query_log_ms > 0 and ms >= s.slow_query_log_ms:
                log.warning("slow SQL statement (%.0f ms) on %s: %s", ms,
                            ",".join(shard_ids), sql[:SLOW_SQL_CHARS])
    return result


def check_result_size(table: pa.Table) -> None:
    cap = query_settings.SETTINGS.max_result_bytes
    size = table.get_total_buffer_size()
    if cap > 0 and size > cap:
        raise SiloError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"query result exceeded max_result_bytes ({size} > {cap} bytes); "
                        "add a LIMIT or a narrower WHERE clause")


async def query_shard(shard, sql: str, params: list) -> pa.Table:
    """One statement over one shard."""
    async def read(planned: Planned) -> list[dict[str, pa.Table]]:
        return [await read_shard(shard, planned, shard.now())]

    return await run_statement([shard.id], sql, params, read)
