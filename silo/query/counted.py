"""COUNT(*) and GROUP BY status_kind from the status counters, one row per counter.

A statement that only counts jobs by tenant / status (`SELECT status_kind, COUNT(*) …
GROUP BY status_kind`, an unfiltered per-tenant `COUNT(*)`) needs no job row: the
shard's status counters (0xF8) hold the answer. Handing DataFusion one synthetic row
per job would still cost time and memory in proportion to the jobs; here it gets one
row per (tenant, status) counter carrying the counter in a weight column, and the
statement it evaluates is the user's with each `COUNT(*)` / `COUNT(1)` replaced by
`coalesce(sum(weight), 0)`. Everything else (grouping, HAVING, ORDER BY, LIMIT,
arithmetic over the counts) is DataFusion's as written, and since the rows of every
shard are concatenated before it runs, the sums are exact across shards too.

The rewrite is only taken when the plan shows it is exact (`weighted_sql`):
* the statement reads one table, `jobs`, through one scan, and needs no column beyond
  tenant, shard_id and status_kind (which the counters give) — no id, metadata or time
  filter, nothing per job;
* the first node above that scan (through projections and filters) is an Aggregate
  whose aggregates are all plain COUNT(*) (no DISTINCT, no FILTER clause), and there is
  no window function anywhere (a window over the rows would see counters, not jobs);
* the rewritten text, planned against the weighted table, has the same output columns
  and an Aggregate whose aggregates are all sums of the weight (and no other aggregate
  touches the weight).
Anything else keeps the ordinary per-job path. The result is cast back to the original
statement's output schema, so column names and types are exactly what the per-job
evaluation returns (COUNT(*) is Int64 either way).
"""

from __future__ import annotations

import re

import pyarrow as pa

from silo.query.schema import JOBS

WEIGHT = "__silo_counted_jobs"
WEIGHTED_JOBS = JOBS.append(pa.field(WEIGHT, pa.int64()))
COUNTER_COLUMNS = frozenset({"tenant", "shard_id", "status_kind"})

_COUNT_CALL = re.compile(r"\bcount\s*\(\s*(?:\*|1)\s*\)", re.IGNORECASE)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_SUM = f"coalesce(sum({WEIGHT}), 0)"
_COUNT_NAME = "count(Int64(1))"  # DataFusion's name for COUNT(*) and COUNT(1)
_THROUGH = ("Projection", "Filter", "SubqueryAlias")


def rewrite_count_calls(sql: str) -> tuple[str, int]:
    """Replace COUNT(*) / COUNT(1) outside quoted literals and identifiers by the sum
    of the weight; return the text and how many were replaced."""
    out: list[str] = []
    n = 0
    pos = 0
    for m in _QUOTED.finditer(sql):
        seg, k = _COUNT_CALL.subn(_SUM, sql[pos:m.start()])
        out += [seg, m.group(0)]
        n += k
        pos = m.end()
    seg, k = _COUNT_CALL.subn(_SUM, sql[pos:])
    out.append(seg)
    return "".join(out), n + k


def _kind(node) -> str:
    return type(node.to_variant()).__name__


def _walk(node, parents: tuple = ()):
    yield node, parents
    for child in node.inputs():
        yield from _walk(child, (node, *parents))


def _jobs_aggregate(plan):
    """The Aggregate right above the plan's only TableScan of jobs (through projections
    and filters), or None when the plan is not that shape or has a window anywhere."""
    scans = []
    for node, parents in _walk(plan):
        kind = _kind(node)
        if kind in ("Window", "WindowAggr"):
            return None
        if kind == "TableScan":
            scans.append((node, parents))
    if len(scans) != 1:
        return None
    scan, parents = scans[0]
    if scan.to_variant().table_name().rsplit(".", 1)[-1] != "jobs":
        return None
    if list(scan.to_variant().filters()):
        return None  # a filter inside the scan might name a column not projected
    proj = scan.to_variant().projection()
    return next((p for p in parents if _kind(p) not in _THROUGH), None), proj


def _columns_of(proj) -> set[str] | None:
    if not proj:
        return set()
    return {c for _, c in proj} if isinstance(proj[0], tuple) else None


def _aggregate_names(agg) -> list[str]:
    return [e.schema_name() for e in agg.to_variant().aggregate_exprs()]


def weighted_sql(sql: str, optimized_plan, planned_schema: pa.Schema, replan) -> str | None:
    """The statement to evaluate over per-counter rows, or None when the per-job path
    must run. `replan(text)` plans a text against the weighted jobs table and returns
    (optimized logical plan, output schema); it raises on a planning error."""
    found = _jobs_aggregate(optimized_plan)
    if found is None:
        return None
    agg, proj = found
    cols = _columns_of(proj)
    if agg is None or _kind(agg) != "Aggregate" or cols is None or not cols <= COUNTER_COLUMNS:
        return None
    names = _aggregate_names(agg)
    if any(n != _COUNT_NAME for n in names):
        return None
    text, replaced = rewrite_count_calls(sql)
    if bool(replaced) != bool(names):
        return None
    try:
        new_plan, new_schema = replan(text)
    except Exception:  # noqa: BLE001 - the rewrite did not fit: the per-job path runs
        return None
    if len(new_schema) != len(planned_schema):
        return None
    found = _jobs_aggregate(new_plan)
    if found is None or found[0] is None or _kind(found[0]) != "Aggregate":
        return None
    new_cols = _columns_of(found[1])
    if new_cols is None or not new_cols <= COUNTER_COLUMNS | {WEIGHT}:
        return None
    new_names = _aggregate_names(found[0])
    if len(new_names) != len(names) or any(WEIGHT not in n or not n.startswith("sum(")
                                           for n in new_names):
        return None
    # No other aggregate of the rewritten statement may sum the weight (a replaced
    # COUNT(*) of an outer query over a subquery column that happens to be so named).
    summing = [node for node, _ in _walk(new_plan) if _kind(node) == "Aggregate"
               and any(WEIGHT in n for n in _aggregate_names(node))]
    return text if len(summing) <= 1 else None


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The weighted statement's result under the original statement's names and types."""
    cols = [c if c.type == f.type else c.cast(f.type)
            for c, f in zip(table.columns, schema, strict=True)]
    return pa.table(cols, schema=schema)


def counter_table(shard_id: str, counts: list[tuple[str, str, int]]) -> pa.Table:
    """One row per (tenant, status_kind, jobs) counter, the count in the weight column."""
    n = len(counts)
    fill = {"shard_id": pa.array([shard_id] * n, type=pa.utf8()),
            "tenant": pa.array([c[0] for c in counts], type=pa.utf8()),
            "status_kind": pa.array([c[1] for c in counts], type=pa.utf8()),
            WEIGHT: pa.array([c[2] for c in counts], type=pa.int64())}
    return pa.table([fill.get(f.name, pa.nulls(n, f.type)) for f in WEIGHTED_JOBS],
                    schema=WEIGHTED_JOBS)
