"""Reading a shard's rows for one Scan (see plan.py), narrowed by the indexes.

Scan strategy, first match wins (behaviour.md §7): exact job ids (point reads) →
metadata key = value (0x04 rows of that value) → metadata key prefix (0x04 range) →
status words (0x03 rows; Waiting and Scheduled split the Scheduled rows at now) →
every job of the tenant(s). A tenant equality always narrows; without one the tenants
are those with jobs on the shard (from the status counters), so id and index reads
stay point/range reads. A jobs scan that needs no column beyond tenant, shard_id and
status_kind (an unfiltered COUNT(*), GROUP BY status_kind) is answered from the status
counters when allowed (count_from_status_counters).

Storage is read in slices (ranges.SLICE rows per await, point reads in groups) and
in-memory state is copied once then converted in chunks; the statement paces itself
between slices (pace.py), so a large scan shares the event loop instead of stalling it.
Rows are read from the database as
applied: every acknowledged write is; an operation still in flight may or may not be
seen, as with any snapshot-free read.
"""

from __future__ import annotations

import itertools

import msgspec
import pyarrow as pa

from silo.query import counted, pace, ranges, timeorder_read
from silo.query.plan import Scan
from silo.query.schema import TABLES
from silo.shard.state import Shard
from silo.storage import keys
from silo.storage.records import (
    SCHEDULED,
    STATUS_NAMES,
    CheckRateLimit,
    ConcurrencyLimit,
    FloatingConcurrencyLimit,
    JobInfo,
    JobStatus,
    RateLimit,
    RefreshFloatingLimit,
    RequestTicket,
    RunAttempt,
    decode_i64,
    job_info_decoder,
    job_status_decoder,
    task_decoder,
)

SLICE = ranges.SLICE
POINT_GROUP = ranges.POINT_GROUP
# Job rows are decoded on the loop in chunks, paced in between (pace.py): a chunk costs
# about a millisecond, less than a GIL hand-off to a decoding thread would (5 ms
# switch interval) for every wake-up of the hot path.
BUILD_CHUNK = 128

_INFO_COLUMNS = frozenset({"priority", "enqueue_time_ms", "payload", "task_group", "metadata",
                           "limits"})
_STATUS_COLUMNS = frozenset({"status_kind", "status_changed_at_ms", "current_attempt",
                             "next_attempt_starts_after_ms"})
_json = msgspec.json.Encoder()
_Raw = tuple[bytes, bytes | None, bytes | None]  # (tenant+job key suffix, status, info)
_any_msgpack = msgspec.msgpack.Decoder()


_rows = ranges.rows
_prefix_rows = ranges.prefix_rows
_gets = ranges.gets


def shard_tenants(shard: Shard) -> list[str]:
    """Tenants with at least one job on the shard (the status counters are complete)."""
    return sorted({t for (t, _), n in shard.tenant_status.items() if n > 0})


# ---- jobs ------------------------------------------------------------------------


def status_word(status: JobStatus, now: int) -> str:
    """The status_kind shown: a Scheduled job that is due is Waiting (§7)."""
    if status.kind == SCHEDULED:
        nxt = status.next_attempt_starts_after_ms
        return "Waiting" if nxt is None or nxt <= now else "Scheduled"
    return STATUS_NAMES[status.kind]


def payload_json(payload: bytes) -> str | None:
    try:
        return _json.encode(_any_msgpack.decode(payload)).decode()
    except (msgspec.DecodeError, msgspec.EncodeError, TypeError, ValueError):
        return None


def limits_json(info: JobInfo) -> str:
    out = []
    for lim in info.limits:
        if isinstance(lim, ConcurrencyLimit):
            out.append({"limit_type": "Concurrency", "key": lim.key,
                        "value": lim.max_concurrency})
        elif isinstance(lim, RateLimit):
            out.append({"limit_type": "Rate", "key": lim.name, "value": lim.limit})
        elif isinstance(lim, FloatingConcurrencyLimit):
            out.append({"limit_type": "Floating Concurrency", "key": lim.key,
                        "value": lim.default_max_concurrency})
    return _json.encode(out).decode()


def _needed(scan: Scan) -> set[str]:
    return set(TABLES[scan.table].names) if scan.columns is None else set(scan.columns)


def _counter_answerable(scan: Scan, allow: bool) -> bool:
    """Nothing but tenant (and status_kind) is needed and nothing else narrows: the
    rows can be synthesised from the status counters."""
    return (allow and _needed(scan) <= {"tenant", "shard_id", "status_kind"}
            and not scan.other_filters and scan.ids is None and scan.meta_exact is None
            and scan.meta_prefix is None)


async def status_counts(shard: Shard, scan: Scan, tenants: list[str], now: int
                        ) -> list[tuple[str, str, int]]:
    """(tenant, status_kind, jobs) from the status counters, zero counts left out;
    Scheduled is split into Waiting and (future) Scheduled by counting the future rows
    of the status index (usually the few)."""
    counts: list[tuple[str, str, int]] = []
    wanted = set(tenants)
    for (t, status), n in sorted(shard.tenant_status.items()):
        if t not in wanted or n <= 0:
            continue
        if status == STATUS_NAMES[SCHEDULED]:
            future = 0
            if "status_kind" in _needed(scan):
                base = keys.status_index_prefix(t, status)
                async for batch in _rows(shard.db, base, keys.status_index(t, status, now, "")):
                    future += len(batch)
            future = min(future, n)
            counts += [(t, "Scheduled", future), (t, "Waiting", n - future)]
        else:
            counts.append((t, status, n))
    if scan.statuses is not None:
        counts = [c for c in counts if c[1] in scan.statuses]
    return [c for c in counts if c[2] > 0]


async def _counted_rows(shard: Shard, scan: Scan, tenants: list[str], now: int) -> pa.Table:
    """One row per job with only shard_id, tenant and status_kind filled, from the
    status counters (for a statement that needs those rows one by one)."""
    counts = await status_counts(shard, scan, tenants, now)
    n_rows = sum(c[2] for c in counts)
    tenant_col = pa.array(list(itertools.chain.from_iterable(
        itertools.repeat(t, n) for t, _, n in counts)), type=pa.utf8())
    status_col = pa.array(list(itertools.chain.from_iterable(
        itertools.repeat(st, n) for _, st, n in counts)), type=pa.utf8())
    schema = TABLES["jobs"]
    fill = {"shard_id": pa.array([shard.id] * n_rows, type=pa.utf8()), "tenant": tenant_col,
            "status_kind": status_col}
    return pa.table([fill.get(f.name, pa.nulls(n_rows, f.type)) for f in schema],
                    schema=schema)


async def _candidate_rows(shard: Shard, scan: Scan, need_info: bool, now: int,
                         part: list[tuple[str, str]]) -> list[_Raw | None]:
    """The raw (key suffix, status, info) rows of candidate jobs; None for a job that is
    gone or whose status no longer matches the status words (index read racing a
    transition)."""
    db = shard.db
    status_keys = [keys.job_status(t, j) for t, j in part]
    # The info row alone proves the job exists (a delete removes both): a statement
    # that needs info but no status column and no status filter skips the status reads.
    need_status = not need_info or scan.statuses is not None or bool(
        _needed(scan) & _STATUS_COLUMNS)
    raw_status = await _gets(db, status_keys) if need_status else [None] * len(part)
    raw_info = (await _gets(db, [keys.job_info(t, j) for t, j in part]) if need_info
                else [None] * len(part))
    out: list[_Raw | None] = []
    for k, rs, ri in zip(status_keys, raw_status, raw_info, strict=True):
        if (rs is None and ri is None) or (need_info and ri is None):
            out.append(None)  # deleted (or never existed)
        elif (scan.statuses is not None and rs is not None
              and status_word(job_status_decoder.decode(rs), now) not in scan.statuses):
            out.append(None)
        else:
            out.append((k[1:], rs, ri))
    return out


async def _tenant_rows(shard: Shard, tenant: str, need_info: bool, limit: int | None,
                       need_status: bool = True) -> list[_Raw]:
    """Every job of a tenant (or its first `limit` by key), without an index. A
    statement that needs info but no status column skips the status rows (the info
    row alone proves the job exists, as in _candidate_rows): half the keys read."""
    db = shard.db
    suffix = keys.enc_str(tenant)
    if need_info and not need_status and limit is None:
        out_info: list[_Raw] = []
        async for batch in _prefix_rows(db, keys.kind_prefix(keys.JOB_INFO) + suffix):
            out_info += [(k[1:], None, v) for k, v in batch]
        return out_info
    statuses: dict[bytes, bytes] = {}
    slice_ = SLICE if limit is None else max(1, min(SLICE, limit))
    async for batch in _rows(db, keys.kind_prefix(keys.JOB_STATUS) + suffix,
                             keys.prefix_end(keys.kind_prefix(keys.JOB_STATUS) + suffix),
                             slice_):
        for r in batch:
            statuses[r.key[1:]] = r.value
        if limit is not None and len(statuses) >= limit:
            break
    if not need_info:
        return [(k, v, None) for k, v in statuses.items()]
    if limit is not None:
        ks = list(statuses)
        infos = await _gets(db, [bytes([keys.JOB_INFO]) + k for k in ks])
        return [(k, statuses[k], ri) for k, ri in zip(ks, infos, strict=True)
                if ri is not None]
    out: list[_Raw] = []
    async for batch in _prefix_rows(db, keys.kind_prefix(keys.JOB_INFO) + suffix):
        out += [(r.key[1:], statuses.get(r.key[1:]), r.value) for r in batch]
    return out


async def read_jobs(shard: Shard, scan: Scan, now: int, *, count_from_counters: bool
                    ) -> pa.Table:
    need = _needed(scan)
    tenants = sorted(scan.tenants) if scan.tenants is not None else shard_tenants(shard)
    if scan.weighted:  # one row per counter; the statement sums them (counted.py)
        return counted.counter_table(shard.id, await status_counts(shard, scan, tenants, now))
    if _counter_answerable(scan, count_from_counters):
        return await _counted_rows(shard, scan, tenants, now)
    need_info = bool(need & _INFO_COLUMNS)
    # First the raw rows, paired by their (tenant, job_id) key suffix, which the status
    # and info keys share; then decoding into Arrow, a chunk at a time.
    raw: list[_Raw] = []
    limit = ranges.pushable_limit(scan)

    async def confirm(part: list[tuple[str, str]]) -> list[_Raw | None]:
        return await _candidate_rows(shard, scan, need_info, now, part)

    index = None if scan.ids is not None else ranges.index_ranges(scan, tenants, now)
    pushed = await timeorder_read.read_jobs(shard, scan, tenants, now)  # the job list
    if pushed is not None:
        raw = pushed
    elif scan.ids is not None:
        cands = [(t, i) for t in tenants for i in sorted(scan.ids)]
        for i in range(0, len(cands), POINT_GROUP):
            raw += [r for r in await confirm(cands[i : i + POINT_GROUP]) if r is not None]
    elif index is not None:
        for rg in index:
            if limit is not None:
                raw += await ranges.limited_candidates(shard.db, rg, limit[0], limit[1],
                                                       confirm)
                continue
            async for batch in _rows(shard.db, rg.start, rg.end):
                got = await confirm([(rg.tenant, rg.decode(r.key)[0]) for r in batch])
                raw += [r for r in got if r is not None]
    else:
        for t in tenants:
            raw += await _tenant_rows(shard, t, need_info, limit[0] if limit else None,
                                      bool(need & _STATUS_COLUMNS))
    parts = []
    # A job met in two index ranges (its status changed between the two reads) is listed
    # twice, possibly chunks apart: one set over all chunks keeps its first row only.
    seen: set[tuple[str, str]] = set()
    for i in range(0, len(raw), BUILD_CHUNK):
        parts.append(_build_jobs(shard.id, need, now, raw[i : i + BUILD_CHUNK], seen))
        await pace.tick()  # let Enqueue/LeaseTasks in between chunks (pace.py)
    if not parts:
        return _build_jobs(shard.id, need, now, [], seen)
    return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


def _build_jobs(shard_id: str, need: set[str], now: int,
                raw: list[tuple[bytes, bytes | None, bytes | None]],
                seen: set[tuple[str, str]]) -> pa.Table:
    """The jobs rows of raw not in seen (a job listed twice: its first row), column by
    column; adds the jobs built to seen.

    Only the columns the statement reads (`need`, from DataFusion's projection) are
    decoded and built; the others are all-null arrays, which the statement never sees.
    Profiled on a 100k-job full scan, building every column one row at a time was
    about 40 % of the loop thread's CPU after the read itself was made cheap (lift.py).
    """
    want_status = bool(need & _STATUS_COLUMNS)
    want_info = bool(need & _INFO_COLUMNS)
    dec_str = keys.dec_str
    dec_status, dec_info = job_status_decoder.decode, job_info_decoder.decode
    tenants: list[str] = []
    ids: list[str] = []
    statuses: list[JobStatus | None] = []
    infos: list[JobInfo | None] = []
    for suffix, rs, ri in raw:
        tenant, pos = dec_str(suffix, 0)
        job_id, _ = dec_str(suffix, pos)
        k = (tenant, job_id)
        if k in seen:
            continue
        seen.add(k)
        tenants.append(tenant)
        ids.append(job_id)
        if want_status:
            statuses.append(dec_status(rs) if rs is not None else None)
        if want_info:
            infos.append(dec_info(ri) if ri is not None else None)
    n = len(ids)
    cols: dict[str, list] = {"shard_id": [shard_id] * n, "tenant": tenants, "id": ids}
    if want_status:
        getters = {
            "status_kind": lambda st: status_word(st, now),
            "status_changed_at_ms": lambda st: st.changed_at_ms,
            "current_attempt": lambda st: st.current_attempt,
            "next_attempt_starts_after_ms": lambda st: st.next_attempt_starts_after_ms,
        }
        for name in _STATUS_COLUMNS & need:
            get = getters[name]
            cols[name] = [None if st is None else get(st) for st in statuses]
    if want_info:
        info_getters = {
            "priority": lambda i: i.priority,
            "enqueue_time_ms": lambda i: i.enqueue_time_ms,
            "payload": lambda i: payload_json(i.payload),
            "task_group": lambda i: i.task_group,
            "metadata": lambda i: list(i.metadata.items()),
            "limits": limits_json,
        }
        for name in _INFO_COLUMNS & need:
            get = info_getters[name]
            cols[name] = [None if i is None else get(i) for i in infos]
    schema = TABLES["jobs"]
    return pa.table([pa.array(cols[f.name], type=f.type) if f.name in cols
                     else pa.nulls(n, f.type) for f in schema], schema=schema)


# ---- tasks (from storage), queues and counts (from memory, plus the holder rows) --


def _variant(task) -> str:
    if isinstance(task, RunAttempt):
        return "RunAttempt"
    if isinstance(task, RequestTicket):
        return "RequestTicket"
    if isinstance(task, CheckRateLimit):
        return "CheckRateLimit"
    return "RefreshFloatingLimit"


async def read_tasks(shard: Shard, scan: Scan) -> pa.Table:
    """The pending task rows (0x05), read from storage: the backlog is not in memory."""
    prefixes = ([keys.task_group_prefix(g) for g in sorted(scan.task_groups)]
                if scan.task_groups is not None else [keys.kind_prefix(keys.TASK)])
    cols: dict[str, list] = {n: [] for n in TABLES["tasks"].names}
    for prefix in prefixes:
        async for batch in _prefix_rows(shard.db, prefix):
            for r in batch:
                k = r.key
                task = task_decoder.decode(r.value)
                group, start, priority, job_id, attempt, tenant = keys.decode_task(k)
                if scan.tenants is not None and task.tenant not in scan.tenants:
                    continue
                refresh = isinstance(task, RefreshFloatingLimit)
                cols["shard_id"].append(shard.id)
                cols["tenant"].append(task.tenant)
                cols["task_group"].append(group)
                cols["start_time_ms"].append(start)
                cols["priority"].append(priority)
                cols["job_id"].append(None if refresh else job_id)
                cols["attempt"].append(None if refresh else attempt)
                cols["variant_type"].append(_variant(task))
                cols["task_id"].append(task.task_id)
                cols["held_queues"].append(
                    _json.encode([] if refresh else list(task.held_queues)).decode())
            await pace.tick()
    schema = TABLES["tasks"]
    return pa.table([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


async def read_queues(shard: Shard, scan: Scan) -> pa.Table:
    tenants = sorted(scan.tenants) if scan.tenants is not None else None
    cols: dict[str, list] = {n: [] for n in TABLES["queues"].names}

    def row(tenant, queue, entry, task_id, job_id, priority, ts) -> None:
        for name, v in zip(TABLES["queues"].names,
                           (shard.id, tenant, queue, entry, task_id, job_id, priority, ts),
                           strict=True):
            cols[name].append(v)

    prefixes = ([keys.kind_prefix(keys.CONCURRENCY_HOLDER) + keys.enc_str(t) for t in tenants]
                if tenants is not None else [keys.kind_prefix(keys.CONCURRENCY_HOLDER)])
    for prefix in prefixes:
        async for batch in _prefix_rows(shard.db, prefix):
            for r in batch:
                tenant, queue, task_id = keys.decode_concurrency_holder(r.key)
                lease = shard.leases.get(task_id)
                job_id = (lease.task.job_id if lease is not None
                          and isinstance(lease.task, RunAttempt) else None)
                row(tenant, queue, "holder", task_id, job_id, None, decode_i64(r.value))
    for ticket in list(shard.requests.values()):
        if tenants is None or ticket.tenant in tenants:
            row(ticket.tenant, ticket.queue, "requester", ticket.task_id, ticket.job_id,
                ticket.priority, ticket.start_ms)
    schema = TABLES["queues"]
    return pa.table([pa.array(cols[f.name], type=f.type) for f in schema], schema=schema)


def read_tenant_counts(shard: Shard, scan: Scan) -> pa.Table:
    rows = [(t, s, n) for (t, s), n in sorted(shard.tenant_status.items())
            if n and (scan.tenants is None or t in scan.tenants)]
    schema = TABLES["tenant_counts"]
    return pa.table([pa.array([shard.id] * len(rows), type=pa.utf8()),
                     pa.array([r[0] for r in rows], type=pa.utf8()),
                     pa.array([r[1] for r in rows], type=pa.utf8()),
                     pa.array([r[2] for r in rows], type=pa.int64())], schema=schema)


def read_queue_counts(shard: Shard, scan: Scan) -> pa.Table:
    stats: dict[tuple[str, str], list] = {}
    for (t, q), cq in list(shard.conc.items()):
        stats.setdefault((t, q), [0, 0, None, None])[0] = len(cq.holders)
    for ticket in list(shard.requests.values()):
        s = stats.setdefault((ticket.tenant, ticket.queue), [0, 0, None, None])
        s[1] += 1
        lim = ticket.limits[ticket.limit_index]
        if isinstance(lim, ConcurrencyLimit):
            s[2], s[3] = lim.max_concurrency, "Fixed"
    for (t, q), st in list(shard.floating.items()):
        s = stats.setdefault((t, q), [0, 0, None, None])
        s[2], s[3] = st.current_max, "Floating"
    rows = [(k, v) for k, v in sorted(stats.items())
            if (scan.tenants is None or k[0] in scan.tenants) and (v[0] or v[1] or v[3])]
    schema = TABLES["queue_counts"]
    data = [[shard.id] * len(rows), [k[0] for k, _ in rows], [k[1] for k, _ in rows],
            [v[0] for _, v in rows], [v[1] for _, v in rows], [v[2] for _, v in rows],
            [v[3] for _, v in rows]]
    return pa.table([pa.array(d, type=f.type) for d, f in zip(data, schema, strict=True)],
                    schema=schema)


async def read_table(shard: Shard, scan: Scan, now: int, *, count_from_counters: bool
                     ) -> pa.Table:
    if scan.table == "jobs":
        return await read_jobs(shard, scan, now, count_from_counters=count_from_counters)
    if scan.table == "tasks":
        return await read_tasks(shard, scan)
    if scan.table == "queues":
        return await read_queues(shard, scan)
    if scan.table == "tenant_counts":
        return read_tenant_counts(shard, scan)
    return read_queue_counts(shard, scan)
