"""Every Prometheus metric of the server, and `GET /metrics` across worker processes.

Instruments are declared once below (name, labels, help). The hot path never touches
prometheus-client: it adds to a plain per-process dict (`Counter.inc`, `Histogram.observe`,
≈0.2 µs), and each worker's `flush_forever` moves the sums into prometheus-client's
multiprocess files once a second. A multiprocess increment writes an mmap under a lock
(≈2.5 µs measured, 5 µs for a histogram); doing that ~10 times per job would cost a few
per cent of throughput, the accumulator costs nothing measurable. Gauges are not
incremented at all: `flush_forever` samples them from shard state.

Multiprocess mode: the supervisor sets `PROMETHEUS_MULTIPROC_DIR` to a fresh directory
under its runtime dir (one per server start, removed at exit) *before* prometheus-client
is imported and before it forks, so every worker inherits multiprocess values. Each
process writes its own `<type>_<pid>.db`; a scrape sums counters and histograms over all
files, dead processes included, so a restarted worker (new pid, new file) neither resets a
counter nor counts twice. Per-shard gauges use `livesum` (a shard lives in one process),
per-process ones `liveall` (with a `pid` label); the supervisor calls `process_exited`
(`mark_process_dead`) when it reaps a worker, which drops that pid's live-gauge files.
Counts a worker had not flushed when it was killed (≤ 1 s) are lost: totals stay
monotonic, they may miss the last second of a crashed process.

Who serves /metrics: the supervisor, from a daemon thread (prometheus-client's own
server). It lives as long as the server, sees every worker's files, answers while a
worker restarts, and a scrape never competes with a worker's event loop. The thread
holds no lock a forked worker needs (children reset prometheus-client's files on the
pid change; CPython re-creates the logging locks after fork), and the supervisor still
never opens a database.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import resource
import time
from typing import Any

log = logging.getLogger("silo.metrics")

FLUSH_INTERVAL_S = 1.0
# SlateDB's snapshot crosses the FFI with ~200 metrics (≈3 ms per shard measured under
# load): sample it every 10th flush only, so it stays ~0.1 % of a core.
SLATEDB_SAMPLE_EVERY = 10
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets (seconds unless named otherwise).
LATENCY_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
          1800.0, 3600.0)
FSYNC_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)
BATCH_OPS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _Instrument:
    """One declared metric: its name, help, labels; bound to prometheus-client lazily."""

    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (), *,
                 mode: str = "livesum", buckets: tuple[float, ...] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labels = labels
        self.mode = mode
        self.buckets = buckets
        self.prom: Any = None
        _ALL.append(self)


_ALL: list[_Instrument] = []


class Counter(_Instrument):
    kind = "counter"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.pending: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...] = (), n: float = 1) -> None:
        p = self.pending
        p[labels] = p.get(labels, 0) + n

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, n in pending.items():
            (self.prom.labels(*labels) if labels else self.prom).inc(n)


class Histogram(_Instrument):
    kind = "histogram"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.pending: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        p = self.pending.get(labels)
        if p is None:
            p = self.pending[labels] = [0.0] * (len(self.buckets) + 2)  # buckets, +Inf, sum
        p[bisect.bisect_left(self.buckets, value)] += 1
        p[-1] += value

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for labels, counts in pending.items():
            child = self.prom.labels(*labels) if labels else self.prom
            # prometheus-client keeps one (non-cumulative) value per bucket and the sum:
            # add our counts to them directly instead of replaying every observation.
            for value, n in zip(child._buckets, counts, strict=False):
                if n:
                    value.inc(n)
            child._sum.inc(counts[-1])


class Gauge(_Instrument):
    kind = "gauge"

    def set(self, labels: tuple[str, ...], value: float) -> None:
        if self.prom is not None:
            (self.prom.labels(*labels) if labels else self.prom).set(value)


def _noop(*_a, **_kw) -> None:
    return None


# ---- the instruments (behaviour.md §9.1 names first, then ours) ---------------------

JOBS_ENQUEUED = Counter("silo_jobs_enqueued_total", "Jobs enqueued", ("shard", "tenant"))
JOBS_DEQUEUED = Counter("silo_jobs_dequeued_total", "Tasks leased to workers",
                        ("shard", "task_group"))
JOBS_COMPLETED = Counter("silo_jobs_completed_total",
                         "Attempt outcomes reported (a failure that retries counts as failed)",
                         ("shard", "status"))
JOB_ATTEMPTS = Counter("silo_job_attempts_total", "Attempts started",
                       ("shard", "task_group", "is_retry"))
JOB_WAIT = Histogram("silo_job_wait_time_seconds", "Enqueue to lease", ("shard", "task_group"),
                     buckets=WAIT_S)
GRPC_REQUESTS = Counter("silo_grpc_requests_total", "gRPC calls served", ("method", "status"))
GRPC_DURATION = Histogram("silo_grpc_request_duration_seconds", "gRPC call latency",
                          ("method",), buckets=LATENCY_S)
POLLS = Counter("silo_polls_total", "LeaseTasks polls of a shard", ("shard", "task_group"))
QUERY_INFLIGHT = Gauge("silo_query_inflight", "SQL statements running", ("shard",))
QUERY_REJECTED = Counter("silo_query_rejected_total", "SQL statements rejected",
                         ("shard", "reason"))
QUERY_CANCELLED = Counter("silo_query_cancelled_total", "SQL statements cancelled",
                          ("shard", "reason"))
QUERY_SCANNED = Counter("silo_query_scanned_keys_total", "Keys scanned by SQL", ("shard",))
QUERY_LOOKUPS = Counter("silo_query_point_lookups_total", "Point lookups by SQL", ("shard",))
SHARDS_OWNED = Gauge("silo_shards_owned", "Shards owned by this node")
SHARDS_OPEN = Gauge("silo_coordination_shards_open", "Shards open on this node")
BROKER_BUFFER = Gauge("silo_broker_buffer_size", "Tasks pending in memory (ready heap)",
                      ("shard", "task_group"))
LEASES_ACTIVE = Gauge("silo_task_leases_active", "Tasks leased and not reported",
                      ("shard", "task_group"))
REAPER_DURATION = Histogram("silo_lease_reaper_duration_seconds", "One reaper pass of a shard",
                            ("shard",), buckets=LATENCY_S)
REAPER_SCANS = Counter("silo_lease_reaper_scans_total", "Reaper passes", ("shard",))
REAPER_REAPED = Counter("silo_lease_reaper_leases_reaped_total", "Expired leases ended",
                        ("shard",))
REAPER_ERRORS = Counter("silo_lease_reaper_errors_total", "Reaper passes that failed",
                        ("shard",))
CONC_GRANTED = Counter("silo_concurrency_tickets_granted_total", "Concurrency slots granted",
                       ("shard", "path"))
CONC_HOLDERS = Gauge("silo_concurrency_holders_cache_holders", "Concurrency slots held",
                     ("shard",))
CONC_QUEUES = Gauge("silo_concurrency_holders_cache_queues", "Concurrency queues in memory",
                    ("shard",))
CONC_PENDING = Gauge("silo_concurrency_pending_grants", "Jobs waiting for a slot",
                     ("shard", "lane"))
SLATEDB_DURABLE_SEQ = Gauge("silo_slatedb_durable_seq", "Last durable sequence number",
                            ("shard",))
# SlateDB's own metrics (its DefaultMetricsRecorder per shard), sampled each flush:
# slatedb name → (our instrument, the slatedb labels it keeps, in order).
_SLATEDB_COUNTERS = {
    "slatedb.db.request_count": ("silo_slatedb_requests_total", "Reads/scans/flushes", ("op",)),
    "slatedb.db.write_batch_count": ("silo_slatedb_write_batches_total", "Write batches", ()),
    "slatedb.db.write_ops": ("silo_slatedb_write_ops_total", "Written keys", ()),
    "slatedb.db.backpressure_count": ("silo_slatedb_backpressure_total",
                                      "Writes delayed by backpressure", ()),
    "slatedb.db.immutable_memtable_flushes": ("silo_slatedb_memtable_flushes_total",
                                              "Memtables flushed to L0", ()),
    "slatedb.db.l0_flush_bytes": ("silo_slatedb_l0_flush_bytes_total", "Bytes flushed to L0",
                                  ()),
    "slatedb.wal.wal_buffer_flushes": ("silo_slatedb_wal_flushes_total", "WAL flushes", ()),
    "slatedb.wal.wal_flush_bytes": ("silo_slatedb_wal_flush_bytes_total", "WAL bytes written",
                                    ()),
    "slatedb.object_store.request_count": ("silo_slatedb_object_store_requests_total",
                                           "Object store requests", ("api", "component")),
    "slatedb.object_store.error_count": ("silo_slatedb_object_store_errors_total",
                                         "Object store errors", ("api", "component")),
    "slatedb.db_cache.access_count": ("silo_slatedb_cache_accesses_total",
                                      "Block/index/filter cache lookups",
                                      ("entry_kind", "result")),
    "slatedb.db.sst_filter_false_positive_count": ("silo_slatedb_sst_filter_false_positives_total",
                                                   "Filter false positives", ("kind",)),
}
_SLATEDB_GAUGES = {
    "slatedb.db.total_mem_size_bytes": ("silo_slatedb_memory_bytes", "Memtables in memory", ()),
    "slatedb.db.l0_sst_count": ("silo_slatedb_l0_sst_count", "L0 SSTs", ()),
    "slatedb.db.sorted_run_count": ("silo_slatedb_sorted_run_count", "Sorted runs", ()),
    "slatedb.wal.wal_buffer_estimated_bytes": ("silo_slatedb_wal_buffer_bytes",
                                               "WAL buffer not yet flushed", ()),
}
_SLATEDB: dict[str, tuple[_Instrument, tuple[str, ...]]] = {}
for _src, (_name, _help, _keep) in _SLATEDB_COUNTERS.items():
    _SLATEDB[_src] = (Counter(_name, _help, ("shard", *_keep)), _keep)
for _src, (_name, _help, _keep) in _SLATEDB_GAUGES.items():
    _SLATEDB[_src] = (Gauge(_name, _help, ("shard", *_keep)), _keep)
_slatedb_last: dict[tuple, int] = {}  # (shard, slatedb name, labels) → last counter value
# The SlateDB metrics a shard's recorder registers for real (silo.storage.slatedb_metrics).
SLATEDB_NAMES = frozenset(_SLATEDB)

# ours
READY_TASKS = Gauge("silo_ready_tasks", "Pending tasks per task group (queue depth)",
                    ("shard", "task_group"))
COMMIT_BATCH_OPS = Histogram("silo_commit_batch_operations",
                             "Operations per group-commit batch", ("shard",), buckets=BATCH_OPS)
COMMIT_DURABLE_WAIT = Histogram("silo_commit_durable_wait_seconds",
                                "Time waiting for a written batch to become durable",
                                ("shard",), buckets=LATENCY_S)
LOCAL_FSYNC = Histogram("silo_local_fsync_seconds",
                        "Time fsyncing a commit's new WAL objects on the local directory store "
                        "(storage.local_fsync), before its operations are answered",
                        ("shard",), buckets=FSYNC_S)
STORAGE_ERRORS = Counter("silo_storage_errors_total", "Failed writes or durability waits",
                         ("shard",))
FORWARDED = Counter("silo_forwarded_calls_total", "Calls forwarded to another worker process",
                    ("method", "peer"))
FORWARD_DURATION = Histogram("silo_forwarded_call_duration_seconds",
                             "Round trip of a forwarded call", ("method",), buckets=LATENCY_S)
SHARD_OPEN_SECONDS = Gauge("silo_shard_open_seconds", "How long the shard's last open took",
                           ("shard",))
PROCESS_CPU = Gauge("silo_process_cpu_seconds", "CPU seconds of the process",
                    ("process",), mode="liveall")
PROCESS_RSS = Gauge("silo_process_resident_memory_bytes", "Resident memory of the process",
                    ("process",), mode="liveall")
METRICS_FLUSHED_AT = Gauge("silo_metrics_flushed_at_seconds",
                           "Wall time at which the process's last counter flush began: a stale "
                           "value means its event loop is stuck; every count made before it "
                           "is in the scrape", ("process",), mode="liveall")
ASYNCIO_TASKS = Gauge("silo_asyncio_tasks", "Alive asyncio tasks of the process",
                      ("process",), mode="liveall")
WORKER_RESTARTS = Counter("silo_worker_restarts_total", "Worker processes restarted",
                          ("worker", "cause"))

_state: dict[str, Any] = {"enabled": False, "tenant_label": False, "process": "supervisor"}


# ---- set-up -------------------------------------------------------------------------


def _bind_all() -> None:
    import prometheus_client as pc  # noqa: PLC0415 - only after MULTIPROC_ENV is set

    registry = pc.CollectorRegistry()  # instruments only; /metrics reads the files
    for inst in _ALL:
        if inst.kind == "counter":
            inst.prom = pc.Counter(inst.name, inst.help, inst.labels, registry=registry)
        elif inst.kind == "histogram":
            inst.prom = pc.Histogram(inst.name, inst.help, inst.labels, registry=registry,
                                     buckets=inst.buckets)
        else:
            inst.prom = pc.Gauge(inst.name, inst.help, inst.labels, registry=registry,
                                 multiprocess_mode=inst.mode)


def start_supervisor(config, runtime_dir: str) -> None:
    """In the supervisor, before any fork: the multiprocess dir, the instruments and the
    /metrics server. With metrics disabled, every instrument becomes a no-op."""
    if not getattr(config, "metrics_enabled", False):
        disable()
        return
    path = os.path.join(runtime_dir, "metrics")
    os.makedirs(path, exist_ok=True)
    os.environ[MULTIPROC_ENV] = path
    import prometheus_client as pc  # noqa: PLC0415

    if pc.values.ValueClass.__name__ != "MmapedValue":  # imported before the env was set
        log.error("prometheus_client was imported too early; metrics disabled")
        disable()
        return
    _bind_all()
    _state["enabled"] = True
    _state["tenant_label"] = bool(getattr(config, "metrics_tenant_label", False))
    _serve(config.metrics_addr, path)


def _serve(addr: str, path: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415
    from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    host, port = addr.rsplit(":", 1)
    try:
        server, _thread = start_http_server(int(port), host.strip("[]"), registry=registry)
    except OSError as e:
        log.error("metrics: cannot listen on %s (%s); serving without /metrics", addr,
                  e.strerror or e)
        return
    log.info("metrics serving on %s:%d/metrics", host, server.server_port)


def start_worker(index: int) -> None:
    """In a worker after fork: label its process gauges (instruments are inherited)."""
    _state["process"] = f"w{index}"


def disable() -> None:
    _state["enabled"] = False
    for inst in _ALL:
        inst.inc = _noop  # type: ignore[method-assign,attr-defined]
        inst.observe = _noop  # type: ignore[method-assign,attr-defined]
        inst.set = _noop  # type: ignore[method-assign,attr-defined]


def enabled() -> bool:
    return bool(_state["enabled"])


def process_exited(pid: int) -> None:
    """The supervisor reaped `pid`: drop its live gauges (its counters keep counting)."""
    if _state["enabled"]:
        from prometheus_client import multiprocess  # noqa: PLC0415

        multiprocess.mark_process_dead(pid)


# ---- hot-path helpers (one call per event) ------------------------------------------


def job_enqueued(shard_id: str, tenant: str) -> None:
    JOBS_ENQUEUED.inc((shard_id, tenant if _state["tenant_label"] else ""))


_OUTCOME_STATUS = {"success": "succeeded", "failure": "failed", "cancelled": "cancelled"}


def job_completed(shard_id: str, kind: str) -> None:
    JOBS_COMPLETED.inc((shard_id, _OUTCOME_STATUS.get(kind, kind)))


def task_leased(shard_id: str, task_group: str, relative_attempt: int, enqueue_ms: int,
                now_ms: int) -> None:
    """A RunAttempt was leased. Wait time counts from the job's (scheduled) start."""
    labels = (shard_id, task_group)
    JOBS_DEQUEUED.inc(labels)
    JOB_ATTEMPTS.inc((shard_id, task_group, "true" if relative_attempt > 1 else "false"))
    JOB_WAIT.observe(labels, max(0, now_ms - enqueue_ms) / 1000)


# ---- the per-worker flush ---------------------------------------------------------------


def sample_node(node, with_slatedb: bool = True) -> None:
    """Set every gauge from the state of this process's shards."""
    SHARDS_OWNED.set((), len(node.owned))
    SHARDS_OPEN.set((), len(node.shards))
    for s in node.shards.values():
        sid = s.id
        for group, n in s.depth.items():
            READY_TASKS.set((sid, group), max(0, n))
        for group, buf in s.buffers.items():
            BROKER_BUFFER.set((sid, group), len(buf.tasks))  # the head held in memory
        by_group: dict[str, int] = dict.fromkeys(s.buffers, 0)
        for lease in s.leases.values():
            g = getattr(lease.task, "task_group", "")
            by_group[g] = by_group.get(g, 0) + 1
        for group, n in by_group.items():
            LEASES_ACTIVE.set((sid, group), n)
        CONC_HOLDERS.set((sid,), sum(len(q.holders) for q in s.conc.values()))
        CONC_QUEUES.set((sid,), len(s.conc))
        CONC_PENDING.set((sid, "cold"), len(s.requests))
        with contextlib.suppress(Exception):  # a closing db has no status; skip this tick
            SLATEDB_DURABLE_SEQ.set((sid,), s.db.status().durable_seq)
        if with_slatedb:
            sample_slatedb(sid)
    sample_process()


def sample_slatedb(shard_id: str) -> None:
    """SlateDB's counters become our counters by their increase since the last sample
    (its values are totals since the database opened); its gauges are copied."""
    from silo.storage.database import METRICS_RECORDERS  # noqa: PLC0415 - storage imports us

    recorder = METRICS_RECORDERS.get(f"shards/{shard_id}")
    if recorder is None:
        return
    sums: dict[tuple, tuple[_Instrument, int]] = {}
    for m in recorder.snapshot():
        target = _SLATEDB.get(m.name)
        if target is None:
            continue
        inst, keep = target
        labels = {lb.key: lb.value for lb in m.labels} if keep else {}
        key = (m.name, shard_id, *(labels.get(k, "") for k in keep))
        value = m.value[0] if not m.value.is_histogram() else 0
        prev_inst, prev = sums.get(key, (inst, 0))
        sums[key] = (inst, prev + int(value))  # labels we drop are summed
    for key, (inst, value) in sums.items():
        labels = key[1:]
        if inst.kind == "gauge":
            inst.set(labels, value)  # type: ignore[attr-defined]
            continue
        last = _slatedb_last.get(key, 0)
        if value != last:
            # a smaller total means the database was reopened: it counts from zero again
            inst.inc(labels, value - last if value > last else value)  # type: ignore[attr-defined]
            _slatedb_last[key] = value


def sample_process() -> None:
    proc = _state["process"]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    PROCESS_CPU.set((proc,), ru.ru_utime + ru.ru_stime)
    try:
        with open("/proc/self/statm", "rb") as f:
            rss_pages = int(f.read().split()[1])
        PROCESS_RSS.set((proc,), rss_pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(RuntimeError):  # no running loop (the supervisor)
        ASYNCIO_TASKS.set((proc,), len(asyncio.all_tasks()))


def flush() -> None:
    """Move every accumulated count into the multiprocess files."""
    if not _state["enabled"]:
        return
    for inst in _ALL:
        if inst.kind != "gauge":
            inst.flush()  # type: ignore[attr-defined]


async def flush_forever(node) -> None:
    """Each worker: sample gauges and flush counters every FLUSH_INTERVAL_S."""
    if not _state["enabled"]:
        return
    tick = 0
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        t0 = time.perf_counter()
        began = time.time()
        try:
            sample_node(node, with_slatedb=tick % SLATEDB_SAMPLE_EVERY == 0)
            tick += 1
            flush()
            # set last: a scrape that sees this time sees every count made before it
            METRICS_FLUSHED_AT.set((_state["process"],), began)
        except Exception:  # noqa: BLE001 - metrics must never take the worker down
            log.exception("metrics flush failed")
        elapsed = time.perf_counter() - t0
        if elapsed > 0.1:
            log.warning("metrics flush took %.0f ms", elapsed * 1000)
