"""Server configuration.

Every option is described once, in ``OPTIONS``; the loader, the ``silo serve`` flags and the
documentation test all read that table, so they cannot drift apart.

Sources, in increasing precedence: built-in defaults < TOML file (``silo serve -c FILE``)
< environment variables (``SILO_<NAME>``) < command-line flags (``--<name>``).

Values from every source go through the same per-option parser, which both converts strings
(from the environment or argv) and validates. A bad value raises ``ConfigError`` with a
one-line message naming the option. ``Config(...)`` built directly (e.g. in tests) is not
validated; only ``load_config`` validates.

This module holds the table (``Config``'s fields and ``OPTIONS``' rows); the parsers the rows
name are :mod:`silo.config_values`' and the reading of file, environment and flags is
:mod:`silo.config_sources`'.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from silo.config_sources import merge_sources
from silo.config_values import Bad, ConfigError, Parser, one_line
from silo.config_values import address as _addr
from silo.config_values import boolean as _bool
from silo.config_values import choice as _choice
from silo.config_values import integer as _int
from silo.config_values import number as _float
from silo.config_values import origin as _origin
from silo.config_values import path as _path
from silo.config_values import token as _token
from silo.config_values import url as _url

__all__ = ["OPTIONS", "Config", "ConfigError", "Option", "load_config"]

MiB = 1024 * 1024


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """The server's effective configuration. Field docs live in ``OPTIONS``."""

    grpc_addr: str = "127.0.0.1:7450"
    advertised_addr: str = ""
    dev_mode: bool = False
    auth_token: str = ""
    max_message_bytes: int = 128 * MiB
    max_inflight_bytes: int = 256 * MiB
    data_dir: str = "./silo-data"
    object_store_url: str = ""
    flush_interval_ms: int = 10
    commit_interval_ms: float = 0.0
    commit_min_gap_ms: float = 0.0
    commit_busy_gap_ms: float = 5.0
    l0_sst_size_bytes: int = 8 * MiB
    flush_on_commit: bool = True
    local_fsync: bool = True
    slatedb_sched_batch: bool = False
    l0_flush_interval_s: int = 30
    compactor_poll_interval_ms: int = 5000
    gc_interval_s: int = 30
    gc_min_age_s: int = 30
    gc_sst_min_age_s: int = 60
    compactor_min_sources: int = 2
    max_unflushed_bytes: int = 32 * MiB
    block_cache_bytes: int = 16 * MiB
    write_timeout_ms: int = 10_000
    shards: int = 0
    tenancy: bool = False
    lease_ms: int = 10_000
    ready_buffer_size: int = 4096
    reaper_interval_ms: int = 1000
    completed_job_expire_s: int = 0
    terminal_job_expire_s: int = 0
    log_level: str = "info"
    log_format: str = "text"
    processes: int = 0
    metrics_enabled: bool = True
    metrics_addr: str = "127.0.0.1:9090"
    metrics_tenant_label: bool = False
    statement_timeout_ms: int = 5000
    max_result_bytes: int = 64 * MiB
    max_concurrent_statements: int = 8
    slow_query_log_ms: int = 1000
    count_from_status_counters: bool = True
    webui_enabled: bool = True
    webui_addr: str = "127.0.0.1:8080"
    webui_public_origin: str = ""
    webui_trust_forwarded: bool = False
    forward_timeout_ms: int = 5000
    liveness_interval_ms: int = 1000
    liveness_misses: int = 10

    def object_store_url_resolved(self) -> str:
        """The SlateDB object store URL; ``file://<abs data_dir>/objects`` when unset."""
        if self.object_store_url:
            return self.object_store_url
        return (Path(os.path.abspath(self.data_dir)) / "objects").as_uri()

    def redacted(self) -> dict[str, object]:
        """All fields as a dict, secrets masked: safe to log."""
        out = msgspec.structs.asdict(self)
        for opt in OPTIONS:
            if opt.secret and out[opt.name]:
                out[opt.name] = "<redacted>"
        return out


_DEFAULTS: dict[str, object] = {f.name: f.default for f in msgspec.structs.fields(Config)}
_TYPES: dict[str, object] = {f.name: f.type for f in msgspec.structs.fields(Config)}


# --- the option table ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Option:
    """One configuration option. ``env``, ``flag`` and ``default`` derive from ``name``."""

    name: str  # Config field name
    toml: str  # "section.key" in the TOML file
    parse: Parser  # converts + validates a raw value; raises Bad
    help: str  # one-line meaning
    metavar: str = ""  # for --help; "" for booleans
    default_doc: str = ""  # how to describe an empty default, e.g. "off"
    secret: bool = False  # never echoed back in errors or logs

    @property
    def env(self) -> str:
        return "SILO_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def section(self) -> str:
        return self.toml.partition(".")[0]

    @property
    def default(self) -> object:
        return _DEFAULTS[self.name]

    @property
    def is_bool(self) -> bool:
        return _TYPES[self.name] is bool

    @property
    def label(self) -> str:
        """e.g. ``shards (SILO_SHARDS / --shards / shards.count)``."""
        return f"{self.name} ({self.env} / {self.flag} / {self.toml})"

    def default_toml(self) -> str:
        """The default as a TOML literal (``10``, ``2.0``, ``false``, ``"info"``)."""
        value = self.default
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return msgspec.json.encode(value).decode()
        return repr(value)

    def coerce(self, raw: object) -> object:
        """Parse and validate ``raw``; raises ConfigError naming this option."""
        try:
            return self.parse(raw)
        except Bad as bad:
            got = "<redacted>" if self.secret else one_line(repr(raw))
            raise ConfigError(f"invalid value for {self.label}: {bad}, got {got}") from None


OPTIONS: tuple[Option, ...] = (
    Option(
        "grpc_addr",
        "server.grpc_addr",
        _addr(allow_empty=False),
        "public gRPC listen address HOST:PORT (port 0 = pick a free port)",
        "HOST:PORT",
    ),
    Option(
        "advertised_addr",
        "server.advertised_addr",
        _addr(allow_empty=True),
        "address put in GetClusterInfo for clients",
        "HOST:PORT",
        default_doc="the bound gRPC address",
    ),
    Option("dev_mode", "server.dev_mode", _bool, "enables ResetShards"),
    Option(
        "auth_token",
        "server.auth_token",
        _token,
        "when set, every Silo RPC needs 'authorization: Bearer <token>'",
        "TOKEN",
        default_doc="off",
        secret=True,
    ),
    Option(
        "max_message_bytes",
        "server.max_message_bytes",
        _int(4 * MiB, unit=" (4 MiB)"),
        "gRPC send/receive message size limit",
        "BYTES",
    ),
    Option(
        "max_inflight_bytes",
        "server.max_inflight_bytes",
        _int(MiB, unit=" (1 MiB)"),
        "request bytes a worker process holds at once; calls past it get RESOURCE_EXHAUSTED",
        "BYTES",
    ),
    Option(
        "data_dir",
        "storage.data_dir",
        _path,
        "where the shard map, lock file and (by default) the SlateDB object store live",
        "DIR",
    ),
    Option(
        "object_store_url",
        "storage.object_store_url",
        _url,
        "SlateDB object store URL: file:///abs/path, memory:///, s3://bucket/prefix",
        "URL",
        default_doc="local directory <data_dir>/objects",
    ),
    Option(
        "flush_interval_ms",
        "storage.flush_interval_ms",
        _int(1, 60_000),
        "SlateDB WAL flush interval; bounds durable-ack latency",
        "MS",
    ),
    Option(
        "commit_interval_ms",
        "storage.commit_interval_ms",
        _float(0, 1000),
        "group-commit cap: longest a batch waits behind a commit in flight (0 = adaptive, no cap)",
        "MS",
    ),
    Option(
        "commit_min_gap_ms",
        "storage.commit_min_gap_ms",
        _float(0, 1000),
        "under concurrency, start a group commit no sooner than this after the previous one "
        "started (0 = off; a lone write still commits at once)",
        "MS",
    ),
    Option(
        "commit_busy_gap_ms",
        "storage.commit_busy_gap_ms",
        _float(0, 1000),
        "the same gap, only while the worker's CPU is saturated (0 = off)",
        "MS",
    ),
    Option(
        "l0_sst_size_bytes",
        "storage.l0_sst_size_bytes",
        _int(MiB, unit=" (1 MiB)"),
        "SlateDB memtable size before flushing to L0",
        "BYTES",
    ),
    Option(
        "flush_on_commit",
        "storage.flush_on_commit",
        _bool,
        "flush the WAL right after each group commit instead of at the next flush "
        "interval: durable acks in ~1-3 ms, one object-store write per commit",
    ),
    Option(
        "local_fsync",
        "storage.local_fsync",
        _bool,
        "on the local directory store, fsync each commit's WAL objects before answering, "
        "and SlateDB's other new files every second (no effect on S3 or memory stores)",
    ),
    Option(
        "slatedb_sched_batch",
        "storage.slatedb_sched_batch",
        _bool,
        "run SlateDB's threads under SCHED_BATCH so a commit's wake-ups do not preempt the "
        "worker's event loop (experimental: fewer context switches, unproven end to end)",
    ),
    Option(
        "l0_flush_interval_s",
        "storage.l0_flush_interval_s",
        _int(0, 86_400),
        "write a shard's memtable to an L0 SST at least this often while it is written, so "
        "WAL objects become garbage and a restart replays little (0 = only when full)",
        "S",
    ),
    Option(
        "compactor_poll_interval_ms",
        "storage.compactor_poll_interval_ms",
        _int(0, 3_600_000),
        "how often SlateDB's compactor looks for L0 SSTs to merge (0 = no compactor)",
        "MS",
    ),
    Option(
        "gc_interval_s",
        "storage.gc_interval_s",
        _int(0, 86_400),
        "how often SlateDB's garbage collector deletes obsolete objects (0 = never)",
        "S",
    ),
    Option(
        "gc_min_age_s",
        "storage.gc_min_age_s",
        _int(1, 30 * 86_400),
        "minimum age of obsolete WAL objects, manifests and compactor files before deletion",
        "S",
    ),
    Option(
        "gc_sst_min_age_s",
        "storage.gc_sst_min_age_s",
        _int(1, 30 * 86_400),
        "minimum age of SSTs no longer in the manifest before deletion",
        "S",
    ),
    Option(
        "compactor_min_sources",
        "storage.compactor_min_sources",
        _int(2, 32),
        "L0 SSTs (or similar-sized sorted runs) merged together by one compaction: 2 merges "
        "into the bottom run, where deleted jobs' tombstones drop, every ~2 L0 flushes",
        "N",
    ),
    Option(
        "max_unflushed_bytes",
        "storage.max_unflushed_bytes",
        _int(4 * MiB, unit=" (4 MiB)"),
        "SlateDB memtables not yet in an L0 SST, per shard, before writes wait for L0 uploads",
        "BYTES",
    ),
    Option(
        "block_cache_bytes",
        "storage.block_cache_bytes",
        _int(0),
        "SST block and metadata cache per worker process, shared by its shards (0 = none)",
        "BYTES",
    ),
    Option(
        "write_timeout_ms",
        "storage.write_timeout_ms",
        _int(100, 600_000),
        "a write not durable this long fails with UNAVAILABLE and health says NOT_SERVING",
        "MS",
    ),
    Option(
        "shards",
        "shards.count",
        _int(0, 4096),
        "number of shards created when the data dir is new (an existing shard map is kept); "
        "0 = one per worker process",
        "N",
        default_doc="0 (one per worker process)",
    ),
    Option("tenancy", "tenancy.enabled", _bool, "tenants required and range-checked"),
    Option("lease_ms", "jobs.lease_ms", _int(1000, 3_600_000), "task lease duration", "MS"),
    Option(
        "ready_buffer_size",
        "jobs.ready_buffer_size",
        _int(16, 1_000_000),
        "pending tasks held in memory per (shard, task group); the rest stay in storage",
        "N",
    ),
    Option(
        "reaper_interval_ms",
        "jobs.reaper_interval_ms",
        _int(10, 60_000),
        "how often expired leases are reaped",
        "MS",
    ),
    Option(
        "completed_job_expire_s",
        "jobs.completed_job_expire_s",
        _int(0),
        "delete Succeeded jobs this many seconds after they finished (0 = keep forever)",
        "S",
        default_doc="0 (off)",
    ),
    Option(
        "terminal_job_expire_s",
        "jobs.terminal_job_expire_s",
        _int(0),
        "delete Failed and Cancelled jobs this many seconds after they ended (0 = keep forever)",
        "S",
        default_doc="0 (off)",
    ),
    Option(
        "log_level",
        "logging.level",
        _choice("debug", "info", "warning", "error"),
        "log level: debug, info, warning or error",
        "LEVEL",
    ),
    Option(
        "log_format",
        "logging.format",
        _choice("text", "json"),
        "log format: text or json",
        "FORMAT",
    ),
    Option(
        "processes",
        "server.processes",
        _int(0, 256),
        "worker processes, each pinned to one core and owning a disjoint set of shards "
        "(0 = one per core this process may run on, at most one per shard)",
        "N",
    ),
    Option("metrics_enabled", "metrics.enabled", _bool, "serve Prometheus metrics"),
    Option(
        "metrics_addr",
        "metrics.addr",
        _addr(allow_empty=False),
        "Prometheus /metrics listen address HOST:PORT (port 0 = pick a free port)",
        "HOST:PORT",
    ),
    Option(
        "metrics_tenant_label",
        "metrics.tenant_label",
        _bool,
        "fill the tenant label of silo_jobs_enqueued_total (one series per tenant)",
    ),
    Option(
        "statement_timeout_ms",
        "server.statement_timeout_ms",
        _int(0, 3_600_000),
        "SQL statement timeout for Query/QueryArrow (0 = off)",
        "MS",
    ),
    Option(
        "max_result_bytes",
        "server.max_result_bytes",
        _int(0),
        "largest unary Query result, Arrow in-memory bytes (0 = off)",
        "BYTES",
    ),
    Option(
        "max_concurrent_statements",
        "server.max_concurrent_statements",
        _int(0, 10_000),
        "SQL statements running at once per shard; more are refused (0 = off)",
        "N",
    ),
    Option(
        "slow_query_log_ms",
        "server.slow_query_log_ms",
        _int(0),
        "SQL statements slower than this are logged at WARN (0 = off)",
        "MS",
    ),
    Option(
        "count_from_status_counters",
        "storage.count_from_status_counters",
        _bool,
        "answer COUNT(*) over jobs, alone or grouped by status_kind, tenant or shard_id, "
        "from the status counters",
    ),
    Option(
        "webui_enabled",
        "webui.enabled",
        _bool,
        "serve the operator web UI (HTML pages and actions) from the server itself",
    ),
    Option(
        "webui_addr",
        "webui.addr",
        _addr(allow_empty=False),
        "web UI listen address HOST:PORT (port 0 = pick a free port)",
        "HOST:PORT",
    ),
    Option(
        "webui_public_origin",
        "webui.public_origin",
        _origin,
        "the web UI's address as browsers see it behind a reverse proxy "
        "(scheme://host[:port]); forms posted from it pass the origin check",
        "ORIGIN",
        default_doc="none",
    ),
    Option(
        "webui_trust_forwarded",
        "webui.trust_forwarded",
        _bool,
        "check a form's origin against X-Forwarded-Host/X-Forwarded-Proto (set only "
        "when a proxy you run always sets them)",
    ),
    Option(
        "forward_timeout_ms",
        "server.forward_timeout_ms",
        _int(100, 600_000),
        "longest wait for another worker process to answer a forwarded call "
        "(then UNAVAILABLE); the caller's own deadline is passed on and shortens it",
        "MS",
    ),
    Option(
        "liveness_interval_ms",
        "server.liveness_interval_ms",
        _int(50, 60_000),
        "how often the supervisor pings each worker process's event loop",
        "MS",
    ),
    Option(
        "liveness_misses",
        "server.liveness_misses",
        _int(2, 10_000),
        "missed pings in a row after which a worker is killed and restarted "
        "(silent for ~3 s, at least 2 pings, it counts as unresponsive: health "
        "NOT_SERVING, LeaseTasks skips it)",
        "N",
    ),
)

if tuple(o.name for o in OPTIONS) != Config.__struct_fields__:  # pragma: no cover
    raise RuntimeError("silo.config: OPTIONS and Config fields are out of sync")


# --- loading -------------------------------------------------------------------------------


def load_config(
    argv_overrides: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: str | os.PathLike[str] | None,
) -> Config:
    """Build a validated Config: defaults < ``config_file`` < ``environ`` < ``argv_overrides``.

    ``argv_overrides`` maps option names (Config field names) to raw values (strings or typed
    values); ``None`` values are ignored. Environment variables set to "" count as unset.
    Raises ConfigError (one-line message) on any invalid input.
    """
    config = Config(**merge_sources(OPTIONS, _DEFAULTS, argv_overrides, environ, config_file))
    _check_combinations(config)
    return config


def _check_combinations(config: Config) -> None:
    """Options valid alone but not together. Without flush_on_commit a commit is durable
    only at SlateDB's next WAL flush tick, so a tick slower than the write bound would
    fail every write as "storage stalled" (the shard's first write at open included)."""
    if not config.flush_on_commit and config.flush_interval_ms >= config.write_timeout_ms:
        raise ConfigError(
            f"invalid value for storage.flush_interval_ms: {config.flush_interval_ms} must be "
            f"below storage.write_timeout_ms ({config.write_timeout_ms}) when "
            "storage.flush_on_commit is off")
