"""Start a real `silo serve` (all its processes) on an ephemeral port and talk gRPC to it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import xxhash

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc

READY = re.compile(r"silo serving on (\S+)")
METRICS = re.compile(r"metrics serving on (\S+)/metrics")
WEBUI = re.compile(r"webui=http://(\S+)")
MAX_MSG = 128 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MSG),
                   ("grpc.max_send_message_length", MAX_MSG)]


class Server:
    """A silo server subprocess. Use as a context manager; always stopped on exit."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.addr = ""
        self.web_addr = ""  # HOST:PORT of the web UI, "" when it is off
        self.log: list[str] = []
        self._ready = threading.Event()

    def start(self, timeout: float = 30.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SILO_")}
        # The tests were written against 8 shards (the server's default is one per worker
        # process); a test that sets the count itself, by flag, env or file, keeps its own.
        if not any(a.split("=")[0] in ("--shards", "-c", "--config") for a in self.args):
            env["SILO_SHARDS"] = "8"
        env.update(self.env)
        self.log = []
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "silo", "serve", "--data-dir", str(self.data_dir),
             "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
             "--webui-addr", "127.0.0.1:0", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))
        if self.proc.poll() is not None:
            raise RuntimeError("server exited:\n" + "".join(self.log[-30:]))
        return self

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            m = READY.search(line)
            if m:
                self.addr = m.group(1)
                w = WEBUI.search(line)
                self.web_addr = w.group(1) if w else ""
                self._ready.set()
        self._ready.set()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    @property
    def metrics_url(self) -> str:
        """http://HOST:PORT/metrics of this server (from its start-up log)."""
        for line in self.log:
            m = METRICS.search(line)
            if m:
                return f"http://{m.group(1)}/metrics"
        raise LookupError("the server logged no metrics address")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.addr, options=CHANNEL_OPTIONS)

    def client(self) -> Client:
        return Client(self.channel())


def hash_tenant(t: str) -> str:
    return xxhash.xxh64_hexdigest(t.encode(), seed=0)


class Client:
    """A thin synchronous test client that routes by tenant like Silo's clients do."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.SiloStub(channel)
        info = self.stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=10)
        self.owners = sorted(info.shard_owners, key=lambda o: o.range_start)

    def shard_for(self, tenant: str | None) -> str:
        h = hash_tenant(tenant if tenant else "-")
        for o in self.owners:
            if (o.range_start == "" or h >= o.range_start) and (o.range_end == "" or h < o.range_end):
                return o.shard_id
        raise LookupError(h)

    def enqueue(self, tenant: str | None = None, **kw) -> str:
        kw.setdefault("task_group", "g")
        kw.setdefault("priority", 50)
        kw.setdefault("start_at_ms", int(time.time() * 1000))
        payload = kw.pop("payload", b"\x80")
        req = pb.EnqueueRequest(shard=self.shard_for(tenant), payload=pb.SerializedBytes(
            msgpack=payload), **kw)
        if tenant is not None:
            req.tenant = tenant
        return self.stub.Enqueue(req, timeout=30).id

    def get(self, job_id: str, tenant: str | None = None, attempts: bool = False):
        req = pb.GetJobRequest(shard=self.shard_for(tenant), id=job_id, include_attempts=attempts)
        if tenant is not None:
            req.tenant = tenant
        return self.stub.GetJob(req, timeout=10)

    def job_req(self, cls, job_id: str, tenant: str | None = None, **kw):
        req = cls(shard=self.shard_for(tenant), id=job_id, **kw)
        if tenant is not None:
            req.tenant = tenant
        return req

    def lease(self, n: int = 10, group: str = "g", worker: str = "w"):
        return self.stub.LeaseTasks(pb.LeaseTasksRequest(worker_id=worker, max_tasks=n,
                                                         task_group=group), timeout=10).tasks

    def report(self, task, **outcome):
        req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id, **outcome)
        if task.HasField("tenant_id"):
            req.tenant_id = task.tenant_id
        return self.stub.ReportOutcome(req, timeout=10)

    def succeed(self, task, result: bytes = b"\xc0"):
        return self.report(task, success=pb.SerializedBytes(msgpack=result))

    def fail(self, task, code: str = "E", data: bytes = b""):
        return self.report(task, failure=pb.Failure(code=code,
                                                    data=pb.SerializedBytes(msgpack=data)))

    def heartbeat(self, task, worker: str = "w"):
        req = pb.HeartbeatRequest(shard=task.shard, worker_id=worker, task_id=task.id)
        if task.HasField("tenant_id"):
            req.tenant_id = task.tenant_id
        return self.stub.Heartbeat(req, timeout=10)


def tenants_covering_all_shards(c: Client, per_shard: int = 2) -> list[str]:
    """Tenants ``tenant-0``, ``tenant-1`` ... picked so that every shard of ``c``'s
    cluster gets ``per_shard`` of them (for tests that must reach every shard)."""
    seen: dict[str, int] = {}
    out: list[str] = []
    i = 0
    while len(seen) < len(c.owners) or min(seen.values()) < per_shard:
        t = f"tenant-{i}"
        sid = c.shard_for(t)
        if seen.get(sid, 0) < per_shard:
            seen[sid] = seen.get(sid, 0) + 1
            out.append(t)
        i += 1
    return out
