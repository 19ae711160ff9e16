#!/usr/bin/env python3
"""A no-op Silo server: what grpcio itself costs, as the baseline of bench/load.py.

    /tmp/venv/bin/python bench/noop_server.py [--grpc-addr 127.0.0.1:0] [--processes 0]

It answers the RPCs that `bench/load.py` sends, with no storage and no state machine:

- GetClusterInfo: one shard covering the whole tenant hash range, owned by this server;
- Enqueue: a fresh job id (or the caller's). The job (id, tenant, priority, payload) is
  appended to an in-memory deque of its task group. Nothing is written anywhere and
  nothing waits for durability;
- LeaseTasks: pops up to max_tasks jobs of the requested task group from that deque
  and returns them as Tasks shaped like the real server's (same fields, same payload), so
  the response sizes match;
- ReportOutcome: OK, whatever the task id;
- GetJob: a Scheduled job with the asked id and a small payload, shaped like the real
  server's answer (for bench/h2load.py's GetJob capacity run).

The gRPC server is built exactly like the real one: uvloop, `grpc.aio.server` with
`silo.rpc.server.server_options(max message bytes)`, and the same garbage-collector
tuning (`silo.runtime.server.tune_gc`). The process layout is the real server's too:
the parent reserves the port (SO_REUSEPORT) and forks `--processes` workers (0 = one per
core this process may run on, like `silo serve`), each pinned to its own core, each
with its own event loop and gRPC server on the shared port; the kernel spreads the
connections over them. Each worker keeps its own deques: a job is leased from the
worker that took its Enqueue (fine for bench/load.py, whose client processes enqueue
and lease over the same connection). There is no forwarding between workers.

The parent prints the real server's ready line, `silo serving on HOST:PORT`, to stderr
once every worker serves, so the load generator starts it the same way. SIGTERM or
SIGINT to the parent stops the workers (grace 2 s) and exits 0; workers die with the
parent however it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

try:
    import silo  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import uvloop

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.ids import new_id
from silo.rpc.server import server_options

SHARD_ID = "00000000-0000-4000-8000-000000000000"
NODE_ID = "noop-baseline"
LEASE_MS = 10_000
MAX_PENDING_PER_GROUP = 2_000_000  # memory bound for long enqueue-only runs
STOP_GRACE_S = 2.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


def tune_gc() -> None:
    """The real server's GC settings (imported, so the baseline follows any change)."""
    try:
        from silo.runtime.server import tune_gc as real_tune_gc
    except Exception as e:  # keep the baseline usable while silo/ is being edited
        print(f"noop: cannot import silo.runtime.server.tune_gc ({e}); using gc defaults",
              file=sys.stderr, flush=True)
        gc.collect()
        return
    real_tune_gc()


class NoopSilo(pb_grpc.SiloServicer):
    """The load's RPCs with no storage: enqueued jobs wait in a deque per task group."""

    def __init__(self) -> None:
        self.addr = ""
        self.pending: dict[str, deque[tuple[str, str | None, int, bytes]]] = {}
        self.enqueued = 0
        self.leased = 0
        self.reported = 0

    async def GetClusterInfo(self, request, context):
        owner = pb.ShardOwner(shard_id=SHARD_ID, grpc_addr=self.addr, node_id=NODE_ID,
                              range_start="", range_end="")
        return pb.GetClusterInfoResponse(
            num_shards=1, shard_owners=[owner], this_node_id=NODE_ID, this_grpc_addr=self.addr,
            members=[pb.ClusterMember(node_id=NODE_ID, grpc_addr=self.addr)])

    async def Enqueue(self, request, context):
        job_id = request.id or new_id()
        tenant = request.tenant if request.HasField("tenant") else None
        q = self.pending.get(request.task_group)
        if q is None:
            q = self.pending[request.task_group] = deque(maxlen=MAX_PENDING_PER_GROUP)
        q.append((job_id, tenant, request.priority, request.payload.msgpack))
        self.enqueued += 1
        return pb.EnqueueResponse(id=job_id)

    async def LeaseTasks(self, request, context):
        q = self.pending.get(request.task_group)
        tasks = []
        if q:
            group = request.task_group
            for _ in range(min(request.max_tasks, len(q))):
                job_id, tenant, priority, payload = q.popleft()
                t = pb.Task(id=new_id(), job_id=job_id, attempt_number=1,
                            relative_attempt_number=1, is_last_attempt=True,
                            payload=pb.SerializedBytes(msgpack=payload), priority=priority,
                            shard=SHARD_ID, task_group=group, lease_ms=LEASE_MS)
                if tenant is not None:
                    t.tenant_id = tenant
                tasks.append(t)
            self.leased += len(tasks)
        return pb.LeaseTasksResponse(tasks=tasks)

    async def ReportOutcome(self, request, context):
        self.reported += 1
        return pb.ReportOutcomeResponse()

    async def GetJob(self, request, context):
        return pb.GetJobResponse(id=request.id, priority=50, enqueue_time_ms=1,
                                 payload=pb.SerializedBytes(msgpack=b"\xc0"),
                                 status=pb.JOB_STATUS_SCHEDULED, status_changed_at_ms=1,
                                 task_group="bench")


async def serve(bind_addr: str, max_message_bytes: int, index: int, ready_fd: int) -> int:
    """One worker: a gRPC server on the shared port until SIGTERM."""
    server = grpc.aio.server(options=server_options(max_message_bytes))
    svc = NoopSilo()
    svc.addr = bind_addr
    pb_grpc.add_SiloServicer_to_server(svc, server)
    server.add_insecure_port(bind_addr)
    await server.start()
    tune_gc()
    os.write(ready_fd, bytes((index,)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(STOP_GRACE_S)
    left = sum(len(q) for q in svc.pending.values())
    print(f"noop worker {index}: enqueued={svc.enqueued} leased={svc.leased}"
          f" reported={svc.reported} pending={left}", file=sys.stderr, flush=True)
    return 0


def reserve_port(addr: str) -> tuple[socket.socket, str]:
    """Bind HOST:PORT (port 0: pick one) with SO_REUSEPORT and keep it, not listening, so
    the port stays ours while the workers' gRPC servers join it. Returns HOST:PORT."""
    host, port = addr.rsplit(":", 1)
    bare = host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in bare else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((bare, int(port)))
    return sock, f"{host}:{sock.getsockname()[1]}"


def worker_main(index: int, cpu: int, bind_addr: str, max_message_bytes: int,
                ready_fd: int) -> int:
    """In the forked child: die with the parent, pin to a core, serve."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        return 1
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpu})
    return uvloop.run(serve(bind_addr, max_message_bytes, index, ready_fd))


def stop_workers(pids: dict[int, int]) -> bool:
    """SIGTERM every worker, SIGKILL the ones still there after STOP_TIMEOUT_S; True if
    all exited 0."""
    ok = True
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    left = dict(pids)
    while left and time.monotonic() < deadline:
        for index, pid in list(left.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del left[index]
                ok = ok and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        time.sleep(0.05)
    for pid in left.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return ok and not left


def supervise(addr: str, processes: int, max_message_bytes: int) -> int:
    cpus = sorted(os.sched_getaffinity(0))
    n = processes or len(cpus)
    try:
        port_sock, bind_addr = reserve_port(addr)
    except OSError as e:
        print(f"noop: cannot listen on {addr}: {e.strerror}", file=sys.stderr)
        return 2
    ready_r, ready_w = os.pipe()
    stopping = False

    def on_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop)
    pids: dict[int, int] = {}
    code = 0
    try:
        for i in range(n):
            pid = os.fork()
            if pid == 0:  # the child: never returns
                rc = 1
                try:
                    os.close(ready_r)
                    port_sock.close()
                    rc = worker_main(i, cpus[i % len(cpus)], bind_addr, max_message_bytes,
                                     ready_w)
                finally:
                    os._exit(rc)
            pids[i] = pid
        ready: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(ready) < n and not stopping:
            if time.monotonic() > deadline:
                print(f"noop: only {len(ready)} of {n} workers started", file=sys.stderr)
                return 1
            r, _, _ = select.select([ready_r], [], [], 0.1)
            if r:
                ready.update(os.read(ready_r, 64))
            for pid in pids.values():
                if os.waitpid(pid, os.WNOHANG)[0]:
                    print(f"noop: worker pid {pid} exited during start-up", file=sys.stderr)
                    return 1
        if not stopping:
            print(f"silo serving on {bind_addr} (no-op baseline: no storage) processes={n}",
                  file=sys.stderr, flush=True)
        while not stopping:
            select.select([ready_r], [], [], 0.2)
            for index, pid in list(pids.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    print(f"noop: worker {index} (pid {pid}) died (status {status}); stopping",
                          file=sys.stderr, flush=True)
                    del pids[index]
                    code = 1
                    stopping = True
    finally:
        if not stop_workers(pids):
            code = code or 1
        port_sock.close()
    print("noop stopped", file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grpc-addr", default="127.0.0.1:0", help="HOST:PORT to listen on")
    ap.add_argument("--processes", type=int, default=0,
                    help="worker processes (0 = one per core this process may run on)")
    ap.add_argument("--max-message-bytes", type=int, default=128 << 20)
    a = ap.parse_args(argv)
    if not 0 <= a.processes <= 256:
        ap.error("--processes must be between 0 and 256")
    return supervise(a.grpc_addr, a.processes, a.max_message_bytes)


if __name__ == "__main__":
    sys.exit(main())
