"""A worker process loads the SQL engine (DataFusion, pyarrow) only at its first statement.

Both cost ~0.3 s of start-up and ~70 MB of RSS per process that a server which only
enqueues and leases never needs (issue 12, start-up within 1 s). Checked from outside:
a native library a process imported is in its /proc/PID/maps.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from silo._proto import silo_pb2 as pb

from .harness import Server

ENGINE_LIBS = ("datafusion", "pyarrow", "libarrow")


def worker_pids(server: Server) -> list[int]:
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return [int(p) for p in children.read_text().split()]


def engine_loaded(pid: int, libs: tuple[str, ...] = ENGINE_LIBS) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return any(lib in maps for lib in libs)


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")


@needs_proc
def test_workers_load_the_sql_engine_only_at_the_first_statement(tmp_path: Path) -> None:
    with Server(tmp_path, "--no-tenancy", "--processes", "2", "--shards", "2",
                "--no-webui-enabled") as srv:
        c = srv.client()
        c.enqueue(task_group="lazy")
        leased = c.stub.LeaseTasks(pb.LeaseTasksRequest(
            worker_id="w", max_tasks=1, task_group="lazy"), timeout=10)
        assert len(leased.tasks) == 1
        pids = worker_pids(srv)
        assert len(pids) == 2
        assert not [p for p in pids if engine_loaded(p)], "a worker imported the SQL engine"

        shard = c.shard_for(None)
        resp = c.stub.Query(pb.QueryRequest(shard=shard, sql="SELECT COUNT(*) AS n FROM jobs"),
                            timeout=30)
        assert resp.row_count == 1
        deadline = time.monotonic() + 10
        while not any(engine_loaded(p) for p in pids):  # the check sees a real import
            assert time.monotonic() < deadline, "no worker shows the engine after a query"
            time.sleep(0.05)


@needs_proc
def test_the_web_ui_does_not_load_datafusion_at_start(tmp_path: Path) -> None:
    """With the web UI on (the default) DataFusion still waits for a statement. (The web
    UI's backend imports pyarrow for a type annotation today, so pyarrow is not checked.)"""
    with Server(tmp_path, "--no-tenancy", "--processes", "2", "--shards", "2") as srv:
        assert srv.web_addr
        c = srv.client()
        c.enqueue(task_group="lazy")
        pids = worker_pids(srv)
        assert len(pids) == 2
        assert not [p for p in pids if engine_loaded(p, ("datafusion",))]
