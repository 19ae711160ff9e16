"""`silo serve`: the supervisor. Forks one worker per core and keeps them running.

The whole lifecycle in one loop: check the data dir and object store, take the data
dir lock and the port, read (or create) the shard map, deal the shards to N workers
(shard i → worker i mod N, deterministic), fork them (each pinned to its own core),
wait until they serve, then:

- ping every worker over its control socket (`silo.runtime.control`); one that misses
  `liveness_misses` pings in a row (stopped, wedged) is killed and replaced;
- restart a worker that dies, with a back-off growing from 0.5 s to 30 s while it keeps
  dying, the others serving throughout; the server only gives up when no worker could
  start at all;
- publish each worker's state and restart count in a shared table
  (`silo.runtime.status`) that workers read for health and routing;
- on SIGTERM/SIGINT stop in two phases: every worker drains its public calls, then,
  once all have, every worker closes; exit 0.

The supervisor never opens a database, nor any other native thread pool: SlateDB's
runtime does not survive a fork, and it forks replacement workers for its whole life.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import math
import mmap
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
import uuid
from pathlib import Path

from silo.cluster.shardmap import load_or_create
from silo.config import Config
from silo.observability import events, metrics
from silo.runtime import control, status
from silo.runtime.checks import StartupError, fail, run_checks
from silo.runtime.forward import new_secret
from silo.runtime.worker import DRAIN_TIMEOUT_S, EXIT_TORN_STORE, WorkerSpec, run_worker

log = logging.getLogger("silo")

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a worker up this long after its last restart starts a fresh back-off
UNRESPONSIVE_S = 3.0  # silent this long (and ≥ 2 pings) = unresponsive


def unresponsive_after(interval_s: float, kill_after: int) -> int:
    """Missed pings after which a worker counts as unresponsive: about UNRESPONSIVE_S of
    silence, at least 2 pings (one late pong under load is not a fault), at most the
    count that gets it killed."""
    return min(kill_after, max(2, math.ceil(UNRESPONSIVE_S / interval_s)))


def backoff_s(failures: int) -> float:
    """Delay before restarting a worker that died `failures` times in a row (≥ 1)."""
    return min(BACKOFF_MIN_S * 2 ** min(max(1, failures) - 1, 32), BACKOFF_MAX_S)


def reserve_port(addr: str) -> tuple[socket.socket, str, int]:
    """Check the port is free (without SO_REUSEPORT) and keep it reserved for the workers.

    gRPC binds with SO_REUSEPORT, so an unrelated server on the same port would silently
    share its connections; binding first without the option makes a second `silo serve`
    fail instead. The reserved socket keeps SO_REUSEPORT so the workers can join it.
    """
    host, port_s = addr.rsplit(":", 1)
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    port = int(port_s)

    def bind(reuseport: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((bare, port))
        except OSError as e:
            sock.close()
            raise StartupError(f"cannot listen on {addr}: {e.strerror}") from None
        return sock

    if port:
        bind(reuseport=False).close()  # fails if any other socket holds the port
    sock = bind(reuseport=True)
    return sock, host, sock.getsockname()[1]


def socket_dir_for(data_dir: Path) -> str:
    """Where the worker sockets live: one fixed directory per data dir, so the next
    start cleans up after a supervisor killed with -9 (short: Unix socket paths are
    limited to 107 bytes)."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"silo-{os.getuid()}-{digest}")


def make_socket_dir(data_dir: Path) -> str:
    """(Re)create the socket dir, mode 0700. We hold the data dir lock, so a dir already
    there is a dead predecessor's; one we do not own is never touched."""
    path = socket_dir_for(data_dir)
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            log.info("removing the socket dir %s left by a previous run", path)
            shutil.rmtree(path, ignore_errors=True)
    try:
        os.mkdir(path, 0o700)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
        return tempfile.mkdtemp(prefix="silo-")  # someone else's path: use a fresh one
    os.chmod(path, 0o700)
    return path


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the supervisor dies, however it dies,
    so a killed server never leaves workers holding the port or the shards."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def worker_count(config: Config, shards: int) -> int:
    n = config.processes or len(os.sched_getaffinity(0))
    return max(1, min(n, shards))


def new_shard_count(config: Config) -> int:
    """Shards of a new data dir: ``shards`` when set, else one per worker process.

    One shard per process is the default because a process's shards each commit on their
    own: on 2 cores, 2 shards instead of 8 cut server CPU per job by a quarter at
    saturation and steady-rate latency by ~3x (bench/README.md, "Stream protocol"). The
    price is that the count is fixed when the dir is created, so the dir can never spread
    over more processes than the host it was created on had; set ``shards`` higher for a
    dir that will move to a bigger host.
    """
    return config.shards or worker_count(config, 4096)


def describe_status(code: int) -> str:
    if os.WIFSIGNALED(code):
        sig = os.WTERMSIG(code)
        return f"killed by signal {sig} ({signal.Signals(sig).name})"
    return f"exited with status {os.WEXITSTATUS(code)}"


class Slot:
    """One worker index: its current process (if any) and its restart history."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pid: int | None = None
        self.ctl: socket.socket | None = None  # the supervisor's end of the control pair
        self.ready = False
        self.ever_ready = False
        self.failed_once = False
        self.torn_store = False  # its last start failed on a torn local store (exit 2)
        self.ready_at = 0.0
        self.failures = 0  # deaths in a row, for the back-off
        self.restarts = 0
        self.respawn_at: float | None = None
        self.spawned_at = 0.0
        self.awaiting_pong = False
        self.missed = 0
        self.kill_cause = ""
        self.drained = False


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots: dict[int, Slot] = {}
        self.stopping = False
        self.table: status.ProcessTable | None = None
        self.lock_fd: int | None = None
        self.sock_dir = ""
        self.web_sock: socket.socket | None = None

    # ---- restart counts, for whoever exports metrics -------------------------------

    def restart_counts(self) -> dict[int, int]:
        """Worker index → restarts since start (also in the shared table for workers)."""
        return {i: s.restarts for i, s in self.slots.items()}

    # ---- lifecycle -------------------------------------------------------------------

    def run(self) -> int:
        try:
            return self._run()
        except StartupError as e:
            return fail(e)

    def _run(self) -> int:
        from silo.runtime.server import lock_data_dir, unlock_data_dir  # noqa: PLC0415

        config = self.config
        data_dir = Path(config.data_dir)
        run_checks(config)
        lock_fd = self.lock_fd = lock_data_dir(data_dir)
        port_sock = None
        try:
            port_sock, host, port = reserve_port(config.grpc_addr)
            self.port_sock = port_sock
            web_addr = ""
            if config.webui_enabled:  # reserved like the gRPC port; every worker serves it
                self.web_sock, web_host, web_port = reserve_port(config.webui_addr)
                web_addr = f"{web_host}:{web_port}"
                # Not imported here: aiohttp + jinja2 cost ~0.5 s before the first fork;
                # each worker imports them once it serves gRPC (silo.runtime.worker).
            web_secret = secrets.token_bytes(32)  # CSRF/session key shared by the workers
            shard_map, created = load_or_create(data_dir, new_shard_count(config))
            if not created and config.shards and len(shard_map.entries) != config.shards:
                log.warning("data dir has %d shards; ignoring shards=%d (the shard map is "
                            "kept)", len(shard_map.entries), config.shards)
            n = worker_count(config, len(shard_map.entries))
            owner_of = {e.shard_id: i % n for i, e in enumerate(shard_map.entries)}
            self.sock_dir = make_socket_dir(data_dir)
            log.info("worker sockets in %s", self.sock_dir)
            metrics.start_supervisor(config, self.sock_dir)  # before any fork
            bind_addr = f"{host}:{port}"
            self.cpus = sorted(os.sched_getaffinity(0))
            counts = mmap.mmap(-1, 8 * len(shard_map.entries))
            self.table = status.ProcessTable(n)
            secret = new_secret()  # inherited by the workers in memory only
            node_id = str(uuid.uuid4())
            self.specs = {
                i: WorkerSpec(config=config, index=i, shard_map=shard_map, owner_of=owner_of,
                              socket_paths={j: os.path.join(self.sock_dir, f"w{j}.sock")
                                            for j in range(n)},
                              bind_addr=bind_addr,
                              advertised_addr=config.advertised_addr or bind_addr,
                              node_id=node_id, counts=counts, secret=secret,
                              table=self.table, web_addr=web_addr, web_secret=web_secret)
                for i in range(n)
            }
            self.slots = {i: Slot(i) for i in range(n)}
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_stop_signal)
            for i in range(n):
                self.spawn(i)
            if not self.start_up():
                self.stop_workers()
                if any(s.torn_store for s in self.slots.values()):
                    # a start-up error naming its cause (exit 2); the worker's one line
                    # before it names the shard and the files
                    raise StartupError("no worker could start: a shard's local store is "
                                       "torn (see the worker's error)")
                return 1
            log.info("silo serving on %s (advertised %s) data_dir=%s shards=%d tenancy=%s "
                     "dev_mode=%s processes=%d webui=%s", bind_addr,
                     config.advertised_addr or bind_addr, data_dir.resolve(),
                     len(shard_map.entries), "on" if config.tenancy else "off",
                     "on" if config.dev_mode else "off", n,
                     f"http://{web_addr}" if web_addr else "off")
            events.startup_config(config)
            self.supervise()
            self.stop_workers()
            log.info("silo stopped")
            return 0
        finally:
            if port_sock is not None:
                port_sock.close()
            if self.web_sock is not None:
                self.web_sock.close()
            if self.sock_dir:
                shutil.rmtree(self.sock_dir, ignore_errors=True)
            unlock_data_dir(data_dir, lock_fd)  # a failed start leaves no lock file

    def _on_stop_signal(self, signum, frame) -> None:
        self.stopping = True

    def spawn(self, index: int) -> None:
        slot = self.slots[index]
        spec = self.specs[index]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                die_with_parent()
                ours.close()
                for other in self.slots.values():  # siblings' control ends are not ours
                    if other.ctl is not None:
                        other.ctl.close()
                if self.lock_fd is not None:
                    os.close(self.lock_fd)  # the lock is the supervisor's alone
                self.port_sock.close()
                if self.web_sock is not None:
                    self.web_sock.close()
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, {self.cpus[index % len(self.cpus)]})
                spec.control_fd = theirs.detach()
                code = run_worker(spec)
            finally:
                logging.shutdown()
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        slot.pid, slot.ctl = pid, ours
        slot.ready = slot.drained = slot.awaiting_pong = False
        slot.missed, slot.kill_cause, slot.respawn_at = 0, "", None
        slot.spawned_at = time.monotonic()
        self._publish(slot, status.STARTING)
        if self.stopping:
            self._send(slot, control.DRAIN)

    def _publish(self, slot: Slot, state: int) -> None:
        if self.table is not None:
            self.table.set_state(slot.index, state)
            self.table.set_pid(slot.index, slot.pid or 0)

    def _send(self, slot: Slot, msg: bytes) -> None:
        if slot.ctl is not None:
            with contextlib.suppress(OSError):
                slot.ctl.send(msg)

    # ---- the event loop --------------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        """Read control messages and reap exited workers."""
        socks = {s.ctl: s for s in self.slots.values() if s.ctl is not None}
        if socks:
            try:
                readable, _, _ = select.select(list(socks), [], [], timeout)
            except InterruptedError:
                readable = []
        else:
            time.sleep(timeout)
            readable = []
        for sock in readable:
            slot = socks[sock]
            try:
                data = sock.recv(256)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sock.close()
                slot.ctl = None
                continue
            for b in data:
                self._on_message(slot, bytes((b,)))
        for slot in self.slots.values():
            if slot.pid is None:
                continue
            done, code = os.waitpid(slot.pid, os.WNOHANG)
            if done:
                self._on_exit(slot, code)

    def _on_message(self, slot: Slot, msg: bytes) -> None:
        if msg == control.PONG:
            slot.awaiting_pong = False
            if slot.missed:
                log.info("worker %d (pid %d) answers again after %d missed pings",
                         slot.index, slot.pid, slot.missed)
            slot.missed = 0
            if slot.ready and not self.stopping:
                self._publish(slot, status.SERVING)
        elif msg == control.SERVING:  # gRPC is up: siblings may forward to it now
            if not self.stopping:
                self._publish(slot, status.SERVING)
        elif msg == control.READY:
            slot.ready = slot.ever_ready = True
            slot.ready_at = time.monotonic()
            if slot.restarts:
                log.info("worker %d is serving again", slot.index)
            self._publish(slot, status.STOPPING if self.stopping else status.SERVING)
        elif msg == control.DRAINED:
            slot.drained = True
            if not self.stopping:  # SIGTERM to that worker alone: let it go, restart it
                self._send(slot, control.CLOSE)

    def _on_exit(self, slot: Slot, code: int) -> None:
        cause = describe_status(code)
        if slot.kill_cause:
            cause = f"{cause} after {slot.kill_cause}"
        pid = slot.pid
        if slot.ctl is not None:
            slot.ctl.close()
        slot.pid, slot.ctl, slot.ready = None, None, False
        self._publish(slot, status.DOWN)
        if self.stopping:
            if not (os.WIFEXITED(code) and os.WEXITSTATUS(code) == 0):
                log.warning("worker %d %s while stopping", slot.index, cause)
            return
        now = time.monotonic()
        if not slot.ever_ready:
            slot.failed_once = True
        slot.torn_store = os.WIFEXITED(code) and os.WEXITSTATUS(code) == EXIT_TORN_STORE
        if slot.ever_ready and slot.ready_at and now - slot.ready_at >= STABLE_S:
            slot.failures = 0
        slot.failures += 1
        slot.restarts += 1
        if self.table is not None:
            self.table.count_restart(slot.index)
        delay = backoff_s(slot.failures)
        log.warning("worker %d (pid %d) %s; restarting it in %.1f s (restart %d, %d "
                    "failure%s in a row)", slot.index, pid, cause, delay, slot.restarts,
                    slot.failures, "" if slot.failures == 1 else "s")
        slot.respawn_at = now + delay
        events.worker_restarted(slot.index, pid or 0, cause, delay)

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.respawn_at is not None and now >= slot.respawn_at and not self.stopping:
                self.spawn(slot.index)

    def _ping(self) -> None:
        """One liveness round: count a miss for each worker that has not answered the
        previous ping; mark it unresponsive, then kill it, past the thresholds."""
        limit = self.config.liveness_misses
        flag_at = unresponsive_after(self.config.liveness_interval_ms / 1000, limit)
        now = time.monotonic()
        for slot in self.slots.values():
            if slot.pid is None or slot.kill_cause:
                continue
            if not slot.ready:
                if now - slot.spawned_at > START_TIMEOUT_S:
                    slot.kill_cause = f"not serving within {START_TIMEOUT_S:.0f} s of its start"
                    log.error("worker %d (pid %d) is %s; killing it", slot.index, slot.pid,
                              slot.kill_cause)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)
                continue
            if slot.awaiting_pong:
                slot.missed += 1
                if slot.missed == flag_at:
                    log.warning("worker %d (pid %d) missed %d liveness pings; unresponsive",
                                slot.index, slot.pid, slot.missed)
                    self._publish(slot, status.UNRESPONSIVE)
                if slot.missed >= limit:
                    slot.kill_cause = f"missing {slot.missed} liveness pings in a row"
                    log.error("worker %d (pid %d) stopped answering (%s); killing it",
                              slot.index, slot.pid, slot.kill_cause)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(slot.pid, signal.SIGKILL)
                    continue
            self._send(slot, control.PING)
            slot.awaiting_pong = True

    def start_up(self) -> bool:
        """Wait until every worker serves. A worker that dies meanwhile is restarted
        like any other; start-up fails only when every worker failed its first start
        (nothing can serve) or none is ready in time."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.stopping:
                return False
            slots = self.slots.values()
            if all(s.ready for s in slots):
                return True
            if any(s.ever_ready for s in slots) and all(s.ever_ready or s.failed_once
                                                         for s in slots):
                return True  # the failing ones keep being restarted meanwhile
            if all(s.failed_once and not s.ever_ready for s in slots):
                log.error("no worker could start; giving up")
                return False
            if time.monotonic() > deadline:
                ready = sum(s.ready for s in slots)
                log.error("workers did not start (%d of %d ready)", ready, len(self.slots))
                return ready > 0
            self._poll(0.05)
            self._respawn_due()

    def supervise(self) -> None:
        interval = self.config.liveness_interval_ms / 1000
        next_ping = time.monotonic() + interval
        while not self.stopping:
            self._poll(min(0.05, max(0.0, next_ping - time.monotonic())))
            if time.monotonic() >= next_ping:
                self._ping()
                next_ping = time.monotonic() + interval
            self._respawn_due()

    def stop_workers(self) -> None:
        """Two phases: DRAIN every worker (public calls finish; forwarded calls are still
        served), then, when all have drained, CLOSE them all."""
        self.stopping = True
        live = [s for s in self.slots.values() if s.pid is not None]
        for slot in live:
            slot.respawn_at = None
            self._publish(slot, status.STOPPING)
            self._send(slot, control.DRAIN)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + 5
        while time.monotonic() < deadline and not all(
                s.drained or s.pid is None or s.ctl is None for s in self.slots.values()):
            self._poll(0.05)
        for slot in self.slots.values():
            if slot.pid is not None and slot.ctl is None:  # no control channel: signal it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)
            self._send(slot, control.CLOSE)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and any(s.pid is not None
                                                  for s in self.slots.values()):
            self._poll(0.05)
        for slot in self.slots.values():
            if slot.pid is None:
                continue
            log.error("worker %d did not stop in time; killing it", slot.index)
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.pid, signal.SIGKILL)
                os.waitpid(slot.pid, 0)
            slot.pid = None

