"""`silo serve`: the supervisor. Forks one worker per core and keeps them running.

The whole lifecycle in one loop: take the data dir lock and the port, read (or create)
the shard map, deal the shards to N workers (shard i → worker i mod N, deterministic),
fork them (each pinned to its own core), wait until all serve, then reap and respawn
crashed workers with back-off until SIGTERM/SIGINT, which drains the workers and exits 0.
A worker that keeps crashing (5 times within a minute) ends the server with exit 1.

The supervisor never opens a database, nor any other native thread pool: SlateDB's
runtime does not survive a fork, and it forks replacement workers for its whole life.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from silo.cluster.shardmap import load_or_create
from silo.config import Config
from silo.runtime.forward import new_secret
from silo.runtime.worker import WorkerSpec, run_worker

log = logging.getLogger("silo")

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 40.0
CRASH_WINDOW_S = 60.0
CRASH_LIMIT = 5


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
            print(f"silo: cannot listen on {addr}: {e.strerror}", file=sys.stderr)
            raise SystemExit(2) from None
        return sock

    if port:
        bind(reuseport=False).close()  # fails if any other socket holds the port
    sock = bind(reuseport=True)
    return sock, host, sock.getsockname()[1]


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


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by signal {sig} ({signal.Signals(sig).name})"
    return f"exited with status {os.WEXITSTATUS(status)}"


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: dict[int, int] = {}  # index → pid
        self.crashes: dict[int, list[float]] = {}
        self.respawn_at: dict[int, float] = {}
        self.stopping = False

    def run(self) -> int:
        from silo.runtime.server import lock_data_dir  # noqa: PLC0415

        config = self.config
        data_dir = Path(config.data_dir)
        lock_fd = self.lock_fd = lock_data_dir(data_dir)
        port_sock, host, port = reserve_port(config.grpc_addr)
        self.port_sock = port_sock
        shard_map, created = load_or_create(data_dir, config.shards)
        if not created and len(shard_map.entries) != config.shards:
            log.warning("data dir has %d shards; ignoring shards=%d (the shard map is kept)",
                        len(shard_map.entries), config.shards)
        n = worker_count(config, len(shard_map.entries))
        owner_of = {e.shard_id: i % n for i, e in enumerate(shard_map.entries)}
        self.sock_dir = tempfile.mkdtemp(prefix="silo-")  # mode 0700: ours alone
        os.chmod(self.sock_dir, 0o700)
        log.info("worker sockets in %s", self.sock_dir)
        secret = new_secret()  # inherited by the workers in memory only
        bind_addr = f"{host}:{port}"
        self.cpus = sorted(os.sched_getaffinity(0))
        counts = mmap.mmap(-1, 8 * len(shard_map.entries))
        self.ready_r, ready_w = os.pipe()
        node_id = str(uuid.uuid4())
        self.specs = {
            i: WorkerSpec(config=config, index=i, shard_map=shard_map, owner_of=owner_of,
                          socket_paths={j: os.path.join(self.sock_dir, f"w{j}.sock")
                                        for j in range(n)},
                          bind_addr=bind_addr,
                          advertised_addr=config.advertised_addr or bind_addr,
                          node_id=node_id, counts=counts, ready_fd=ready_w, secret=secret)
            for i in range(n)
        }
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        try:
            for i in range(n):
                self.spawn(i)
            if not self.wait_ready(n):
                self.stop_workers()
                return 1
            log.info("silo serving on %s (advertised %s) data_dir=%s shards=%d tenancy=%s "
                     "dev_mode=%s processes=%d", bind_addr, config.advertised_addr or bind_addr,
                     data_dir.resolve(), len(shard_map.entries),
                     "on" if config.tenancy else "off", "on" if config.dev_mode else "off", n)
            code = self.supervise()
            self.stop_workers()
            log.info("silo stopped")
            return code
        finally:
            port_sock.close()
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            os.close(lock_fd)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stopping = True

    def spawn(self, index: int) -> None:
        spec = self.specs[index]
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                die_with_parent()
                os.close(self.ready_r)
                os.close(self.lock_fd)  # the lock is the supervisor's alone
                self.port_sock.close()
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, {self.cpus[index % len(self.cpus)]})
                code = run_worker(spec)
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[index] = pid

    def wait_ready(self, n: int) -> bool:
        ready: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(ready) < n:
            if self.stopping or time.monotonic() > deadline:
                log.error("workers did not start (%d of %d ready)", len(ready), n)
                return False
            r, _, _ = select.select([self.ready_r], [], [], 0.1)
            if r:
                ready.update(os.read(self.ready_r, 64))
            for index, pid in list(self.workers.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    log.error("worker %d %s during start-up", index, describe_status(status))
                    del self.workers[index]
                    return False
        return True

    def supervise(self) -> int:
        while not self.stopping:
            r, _, _ = select.select([self.ready_r], [], [], 0.05)
            if r:
                for index in os.read(self.ready_r, 64):
                    log.info("worker %d is serving again", index)
            for index, pid in list(self.workers.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
                del self.workers[index]
                if self.stopping:
                    break
                now = time.monotonic()
                recent = [t for t in self.crashes.get(index, []) if now - t < CRASH_WINDOW_S]
                recent.append(now)
                self.crashes[index] = recent
                if len(recent) >= CRASH_LIMIT:
                    log.error("worker %d (pid %d) %s; %d crashes within %.0f s, giving up",
                              index, pid, describe_status(status), len(recent), CRASH_WINDOW_S)
                    return 1
                delay = min(0.2 * 2 ** (len(recent) - 1), 10.0)
                log.warning("worker %d (pid %d) %s; restarting in %.1f s",
                            index, pid, describe_status(status), delay)
                self.respawn_at[index] = now + delay
            for index, at in list(self.respawn_at.items()):
                if time.monotonic() >= at and not self.stopping:
                    del self.respawn_at[index]
                    self.spawn(index)
        return 0

    def stop_workers(self) -> None:
        for pid in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while self.workers and time.monotonic() < deadline:
            for index, pid in list(self.workers.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    del self.workers[index]
                    if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                        log.warning("worker %d %s while stopping", index,
                                    describe_status(status))
            time.sleep(0.05)
        for index, pid in self.workers.items():
            log.error("worker %d did not stop in time; killing it", index)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self.workers.clear()
