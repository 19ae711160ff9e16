"""One worker process: its own uvloop, its shards, the shared public port, its socket.

Started by the supervisor after fork. Builds everything (event loop, SlateDB handles,
gRPC server) only now, in the child: native thread pools must not cross a fork.

Start-up order, for the time to the first lease: the shards open, the gRPC server
starts and the supervisor is told (SERVING, so siblings forward to us); only then does a
thread import the web UI stack (aiohttp, jinja2: ~0.5 s of CPU that no lease needs)
while leases are already served, the collector is tuned (tune_gc: a full collection),
and READY (the supervisor's ready line) follows once the web UI serves too. After
READY, an older shard without task-group counters counts its queue once
(silo.shard.depth). The SQL engine is imported at the first statement
(silo.rpc.query). Measured in bench/deep_queue.py ("restart").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import signal

import grpc
import uvloop

from silo.cluster.shardmap import ShardMap
from silo.config import Config
from silo.observability import metrics, profiling, tracing
from silo.query import settings as query_settings
from silo.rpc.admission import guard_dispatch, process_admission
from silo.rpc.query import add_query_service
from silo.rpc.server import build_server, mark_serving, watch_storage
from silo.rpc.service import SiloService
from silo.runtime import forward
from silo.runtime.control import DRAINED, READY, SERVING, WorkerControl
from silo.runtime.forward import PeerServer
from silo.runtime.health import follow_node_health
from silo.runtime.node import Node
from silo.runtime.status import ProcessTable
from silo.runtime.trim import limit_arenas, trim_forever
from silo.shard.state import ShardConfig
from silo.storage import local_sync, sched, wake
from silo.storage.slatedb_settings import StorageTuning, set_block_cache_bytes, slatedb_settings
from silo.storage.wal_tail import TornStoreError

log = logging.getLogger("silo.worker")

DRAIN_TIMEOUT_S = 10.0
LAME_DUCK_S = 0.3  # new public calls answered UNAVAILABLE before the gRPC server stops
CLOSE_WAIT_S = 30.0  # a drained worker waits this long at most for the supervisor's CLOSE
STORAGE_FAILED = 70  # exit status: a shard's storage failed; the supervisor restarts us
EXIT_TORN_STORE = 2  # exit status: a shard's local store is torn (wal_tail.TornStoreError)


class WorkerSpec:
    """Everything a worker needs from the supervisor, fixed before the fork."""

    def __init__(self, *, config: Config, index: int, shard_map: ShardMap,
                 owner_of: dict[str, int], socket_paths: dict[int, str], bind_addr: str,
                 advertised_addr: str, node_id: str, counts: mmap.mmap | None,
                 secret: bytes = b"", table: ProcessTable | None = None,
                 web_addr: str = "", web_secret: bytes = b"") -> None:
        self.config = config
        self.index = index
        self.shard_map = shard_map
        self.owner_of = owner_of
        self.socket_paths = socket_paths
        self.bind_addr = bind_addr
        self.advertised_addr = advertised_addr
        self.node_id = node_id
        self.counts = counts
        self.secret = secret  # authenticates sibling workers on the Unix sockets
        self.table = table  # the supervisor's view of every process (read only here)
        self.control_fd: int | None = None  # this worker's end of its control socketpair
        self.web_addr = web_addr  # "" = no web UI; else reserved by the supervisor
        self.web_secret = web_secret  # the same for every worker: see silo.web.security


def shard_config(config: Config) -> ShardConfig:
    """The per-shard settings every worker derives from the configuration; tools that
    open a data dir offline (bench/fill.py) call this too, so they open it exactly as a
    server would."""
    return ShardConfig(
        lease_ms=config.lease_ms, flush_interval_ms=config.flush_interval_ms,
        commit_interval_ms=config.commit_interval_ms, commit_min_gap_ms=config.commit_min_gap_ms,
        commit_busy_gap_ms=config.commit_busy_gap_ms,
        l0_sst_size_bytes=config.l0_sst_size_bytes, flush_on_commit=config.flush_on_commit,
        completed_job_expire_ms=config.completed_job_expire_s * 1000,
        terminal_job_expire_ms=config.terminal_job_expire_s * 1000,
        slatedb=slatedb_settings(StorageTuning(
            config.compactor_poll_interval_ms, config.gc_interval_s, config.gc_min_age_s,
            config.gc_sst_min_age_s, config.compactor_min_sources, config.max_unflushed_bytes)),
        l0_flush_interval_s=config.l0_flush_interval_s,
        write_timeout_ms=config.write_timeout_ms, ready_buffer_size=config.ready_buffer_size)


async def serve_worker(spec: WorkerSpec) -> int:
    """Serve until told to stop. The stop is two-phase, coordinated by the supervisor:
    DRAIN stops public calls and finishes those in flight (they may still forward to
    peers, which keep serving forwarded calls), DRAINED is reported, and only on CLOSE,
    once every worker has drained, are forwarded calls finished and the shards closed."""
    config = spec.config
    control = WorkerControl(spec.control_fd) if spec.control_fd is not None else None
    metrics.start_worker(spec.index)
    tracing.start_worker(spec.index)
    profiling.allow_ptrace_from_parent()
    wake.install()  # SlateDB completions without Python on Tokio threads (silo.storage.wake)
    set_block_cache_bytes(config.block_cache_bytes)  # shared by this process's shards
    local_sync.configure(config.local_fsync)  # before any shard opens
    sched.configure(config.slatedb_sched_batch)
    node = Node(
        spec.shard_map,
        config.object_store_url_resolved(),
        shard_config(config),
        tenancy=config.tenancy,
        dev_mode=config.dev_mode,
        advertised_addr=spec.advertised_addr,
        reaper_interval_ms=config.reaper_interval_ms,
        node_id=spec.node_id,
        index=spec.index,
        owner_of=spec.owner_of,
        peer_paths=spec.socket_paths,
        counts=spec.counts,
        peer_secret=spec.secret,
        forward_timeout_ms=config.forward_timeout_ms,
        table=spec.table,
    )
    await node.open()
    flusher = asyncio.create_task(metrics.flush_forever(node), name="silo-metrics")
    trimmer = asyncio.create_task(trim_forever(), name="silo-trim")  # storage's freed memory
    fatal = asyncio.Event()

    def storage_failed(e: BaseException) -> None:
        # Acknowledged writes are durable; nothing staged after the failure can be.
        # Exit so the supervisor restarts this worker and reopens its shards cleanly.
        log.error("worker %d: shard storage failed (%s); restarting the worker", spec.index, e)
        fatal.set()

    for shard in node.shards.values():
        shard.committer.on_failure = storage_failed
    service = SiloService(node, auth_token=config.auth_token)
    path = spec.socket_paths[spec.index]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by a crashed predecessor
    admission = process_admission(config.max_inflight_bytes)
    peer_server = PeerServer(path, guard_dispatch(service.dispatch, admission), spec.secret)
    await peer_server.start()
    server = build_server(service, config.max_message_bytes, admission)
    query_settings.configure(config)
    add_query_service(server, service)
    server.add_insecure_port(spec.bind_addr)
    await server.start()
    await mark_serving(server)
    # Health is NOT_SERVING while any process of the node is down or this process's
    # storage is stalled: the node follower publishes both when there is a table.
    watch_storage(server, [s.committer for s in node.shards.values()], admission,
                  publish=spec.table is None)
    health = (asyncio.create_task(follow_node_health(
                  server, spec.table, stalled=lambda: admission.storage_stalled))
              if spec.table is not None else None)
    # spec.table (node.table) holds the supervisor's view of every process, restart
    # counts included (ProcessTable.restarts / snapshot), for metrics to export.
    if control is not None:
        control.send(SERVING)  # gRPC serves: siblings forward to us from now on
    web_ui = None
    if spec.web_addr:
        web_cls = await asyncio.get_running_loop().run_in_executor(None, _import_web_stack)
        web_ui = web_cls(service, config, spec.web_addr, spec.web_secret)
        await web_ui.start()
    from silo.runtime.server import tune_gc  # noqa: PLC0415 - avoid an import cycle

    # Only now: the full collection before freezing the start-up objects (the web stack's
    # modules among them) costs ~40 ms that the first leases do not wait for.
    tune_gc()
    log.info("worker %d (pid %d) serving %d shards", spec.index, os.getpid(), len(node.shards))
    if control is not None:
        control.send(READY)
    node.start_depth_counts()
    stop = control.drain if control is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGTERM to this worker alone drains it like the supervisor's DRAIN; SIGINT is the
    # terminal's Ctrl-C, sent to every process of the group: the supervisor coordinates.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    with contextlib.suppress(ValueError, OSError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(fatal.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    flusher.cancel()
    trimmer.cancel()
    if health is not None:
        health.cancel()
    await lame_duck(server)
    await server.stop(DRAIN_TIMEOUT_S)  # public calls: no new ones, those in flight end
    if web_ui is not None:
        await web_ui.close()
    if fatal.is_set():
        # Calls on the failed shard already fail fast (UNAVAILABLE); the others got the
        # same drain as a graceful stop so they finish instead of being cancelled.
        await peer_server.close(grace_s=1.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(node.close(), 5.0)
        return STORAGE_FAILED
    if control is not None:
        control.send(DRAINED)
        # Peers may still be draining calls that forward to our shards: serve them
        # until the supervisor says every worker has drained.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(control.close.wait(), CLOSE_WAIT_S)
        control.stop()
    await peer_server.close(grace_s=DRAIN_TIMEOUT_S)
    await node.close()
    metrics.flush()
    tracing.shutdown()
    log.info("worker %d stopped", spec.index)
    return 0


def _import_web_stack():
    """The web UI's class, imported in a thread while gRPC already serves (see the
    module docstring): aiohttp only when serving the UI."""
    from silo.web.serve import WebUI  # noqa: PLC0415

    return WebUI


async def lame_duck(server: grpc.aio.Server) -> None:
    """Before the gRPC server stops: say NOT_SERVING and answer new calls UNAVAILABLE
    for a moment, so clients move off this process instead of having calls that reach
    it during the shutdown cancelled."""
    forward.stop_admitting()
    hs = server.health_servicer  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        await hs.enter_graceful_shutdown()
    await asyncio.sleep(LAME_DUCK_S)


def run_worker(spec: WorkerSpec) -> int:
    """Entry point in the forked child; returns the process exit code."""
    from silo.runtime.server import setup_logging  # noqa: PLC0415 - avoid an import cycle

    setup_logging(spec.config.log_level, spec.config.log_format, worker=spec.index)
    limit_arenas()  # before SlateDB's and gRPC's threads start (silo.runtime.trim)
    try:
        return uvloop.run(serve_worker(spec))
    except TornStoreError as e:  # one line naming the shard and files: no traceback
        log.error("worker %d failed: %s", spec.index, e)
        return EXIT_TORN_STORE
    except Exception:  # noqa: BLE001 - report, then let the supervisor restart us
        log.exception("worker %d failed", spec.index)
        return 1
