"""The client-side `silo` subcommands, run as `python -m silo ...` subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from tests.integration.harness import Server, hash_tenant


def silo(*args: str, server=None, check: bool = True, timeout: float = 30,
         cwd=None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "silo", *args]
    if server is not None:
        cmd += ["--server", server.addr]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SILO_")})
    if check:
        assert p.returncode == 0, p.stderr
    return p


def silo_json(*args: str, server=None):
    return json.loads(silo(*args, "--json", server=server).stdout)


def group() -> str:
    return "cli-" + uuid.uuid4().hex[:8]


def test_cluster_info(server):
    doc = silo_json("cluster", "info", server=server)
    assert doc["num_shards"] == 8 and len(doc["shards"]) == 8
    assert doc["this_grpc_addr"] == server.addr
    shards = doc["shards"]
    assert shards[0]["range_start"] == "" and shards[-1]["range_end"] == ""
    assert [s["range_start"] for s in shards[1:]] == [s["range_end"] for s in shards[:-1]]
    assert all(s["grpc_addr"] == server.addr for s in shards)
    text = silo("cluster", "info", server=server).stdout
    assert "SHARD" in text and "RANGE START" in text and shards[3]["shard_id"] in text


def test_tenant_hash_and_locate(server, client):
    assert silo_json("tenant", "hash", "test-tenant") == {"tenant": "test-tenant",
                                                          "hash": "7bda10a719882c53"}
    assert silo("tenant", "hash", "ünï").stdout.strip() == "0de04b65318f8bc9"
    doc = silo_json("tenant", "locate", "acme", server=server)
    assert doc["hash"] == hash_tenant("acme") and doc["grpc_addr"] == server.addr
    owner = next(o for o in client.owners if o.shard_id == doc["shard_id"])
    assert (doc["range_start"], doc["range_end"]) == (owner.range_start, owner.range_end)
    assert owner.shard_id == client.shard_for("acme")


def test_enqueue_get_cancel_result_delete(server):
    g = group()
    doc = silo_json("enqueue", "--task-group", g, "--payload", '{"a": [1, 2], "b": "ü"}',
                    "-m", "k=v", "--priority", "9", "--delay", "3600", server=server)
    jid = doc["id"]
    assert doc["tenant"] is None and doc["task_group"] == g
    job = silo_json("job", "get", jid, server=server)
    assert job["id"] == jid and job["status"] == "Scheduled" and job["priority"] == 9
    assert job["payload"] == {"a": [1, 2], "b": "ü"} and job["metadata"] == {"k": "v"}
    assert job["task_group"] == g
    text = silo("job", "get", jid, server=server).stdout
    assert "Scheduled" in text and jid in text
    # Not finished yet: exit code 3 and a one-line message.
    p = silo("job", "result", jid, server=server, check=False)
    assert p.returncode == 3 and p.stderr.strip().count("\n") == 0
    assert "not in a terminal state (status: Scheduled)" in p.stderr
    assert silo_json("job", "cancel", jid, server=server) == {
        "id": jid, "tenant": None, "action": "cancel", "ok": True}
    p = silo("job", "result", jid, "--json", server=server, check=False)
    res = json.loads(p.stdout)
    assert res["status"] == "Cancelled" and res["result"] is None and p.returncode == 5
    p = silo("job", "cancel", jid, server=server, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == "silo: error: FAILED_PRECONDITION: job is already cancelled"
    assert silo("job", "restart", jid, server=server).stdout.strip() == f"restarted job {jid}"
    silo("job", "expedite", jid, server=server)
    assert silo_json("job", "get", jid, server=server)["status"] == "Scheduled"
    silo("job", "cancel", jid, server=server)
    assert silo_json("job", "delete", jid, server=server)["ok"] is True
    p = silo("job", "get", jid, server=server, check=False)
    assert p.returncode == 1
    assert p.stderr.strip() == f"silo: error: NOT_FOUND: Job {jid} not found"


def test_errors_are_one_line_with_nonzero_exit(server, tmp_path):
    p = silo("query", "SELEC 1", server=server, check=False)
    assert p.returncode == 1 and p.stderr.startswith("silo: error: INVALID_ARGUMENT: SQL error")
    assert p.stderr.strip().count("\n") == 0
    p = silo("enqueue", "--task-group", "g", "--payload", "{not json", server=server,
             check=False)
    assert p.returncode == 2 and "bad --payload" in p.stderr
    p = silo("enqueue", "--task-group", "g", "--tenant", "acme", server=server, check=False)
    assert p.returncode == 1 and "FAILED_PRECONDITION" in p.stderr
    p = subprocess.run([sys.executable, "-m", "silo", "cluster", "info", "--server",
                        "127.0.0.1:1"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1 and p.stderr.startswith("silo: error: cannot reach the cluster")
    p = silo("worker", "no_such_module_xyz:handler", "--task-group", "g", server=server,
             check=False, cwd=tmp_path)
    assert p.returncode == 2 and "cannot load handler" in p.stderr


HANDLER_MODULE = textwrap.dedent("""
    import asyncio
    import os

    async def handle(ctx):
        if ctx.payload.get("slow"):
            await asyncio.sleep(1.0)
        gate = ctx.payload.get("gate")
        while gate and not os.path.exists(gate):  # runs until the test opens the gate
            await asyncio.sleep(0.05)
        return {"doubled": ctx.payload["n"] * 2}
""")


class WorkerProcess:
    def __init__(self, server, cwd, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "silo", "worker", *args, "--server", server.addr],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("SILO_")})
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = 20) -> None:
        end = time.monotonic() + timeout
        with self._cond:
            while not any(text in ln for ln in self.lines):
                left = end - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<eof>"):
                    raise AssertionError(f"{text!r} not seen:\n" + "".join(self.lines))
                self._cond.wait(left)


def test_worker_command_processes_jobs_and_stops_gracefully_on_sigterm(tmp_path):
    # Its own server with a long lease: the shared one's 1 s lease can expire under load
    # while the slow task runs. The slow task runs until the test opens its gate, so the
    # test always sees it Running, and SIGTERM always lands mid-task.
    with Server(tmp_path / "d", "--lease-ms", "30000") as server:
        _worker_sigterm_scenario(server, tmp_path)


def _worker_sigterm_scenario(server, tmp_path) -> None:
    (tmp_path / "jobs_mod.py").write_text(HANDLER_MODULE)
    g = group()
    gate = tmp_path / "gate"
    w = WorkerProcess(server, tmp_path, "jobs_mod:handle", "--task-group", g,
                      "--poll-interval", "0.05", "--heartbeat-interval", "0.3")
    try:
        w.wait_for("polling task group")
        ids = [silo_json("enqueue", "-g", g, "-p", json.dumps({"n": n}), server=server)["id"]
               for n in range(3)]
        for n, jid in enumerate(ids):
            res = silo_json("job", "result", jid, "--wait", "--wait-timeout", "20",
                            "--poll-interval", "0.05", server=server)
            assert res["status"] == "Succeeded" and res["result"] == {"doubled": 2 * n}
        # SIGTERM while a slow task runs: the worker lets it finish, then exits 0.
        slow = silo_json("enqueue", "-g", g, "-p", json.dumps({"n": 5, "gate": str(gate)}),
                         server=server)["id"]
        deadline = time.monotonic() + 60
        while silo_json("job", "get", slow, server=server)["status"] != "Running":
            assert time.monotonic() < deadline, "the slow job never started"
            time.sleep(0.05)
        w.proc.send_signal(signal.SIGTERM)
        w.wait_for("silo worker: stopping", timeout=30)
        assert w.proc.poll() is None  # still finishing the running task
        gate.touch()
        assert w.proc.wait(30) == 0
        w.wait_for("silo worker: stopped (4 succeeded")
        res = silo_json("job", "result", slow, server=server)
        assert res["status"] == "Succeeded" and res["result"] == {"doubled": 10}
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)


def test_quickstart_example_runs(server):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, os.path.join(root, "examples", "quickstart.py"),
                        server.addr], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("enqueued 4 jobs")
    assert sum(": Succeeded: " in ln for ln in lines) == 3
    assert sum(": Failed: BAD_SIZE" in ln for ln in lines) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_worker_command_exits_on_sigint_when_idle(server, tmp_path, sig):
    (tmp_path / "jobs_mod.py").write_text(HANDLER_MODULE)
    w = WorkerProcess(server, tmp_path, "jobs_mod:handle", "--task-group", group(),
                      "--poll-interval", "0.05")
    try:
        w.wait_for("polling task group")
        w.proc.send_signal(sig)
        assert w.proc.wait(30) == 0
        w.wait_for("silo worker: stopped (0 succeeded")
    finally:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(10)
