"""bench/fill.py builds a data dir that the real server opens unchanged: the jobs it
reports are there, by status, metadata and task group, counted through Query, and its
queued jobs can be leased."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server

FILL = Path(__file__).resolve().parents[2] / "bench" / "fill.py"


def fill(data_dir: Path, *args: str) -> dict:
    out = data_dir.parent / f"{data_dir.name}.json"
    subprocess.run([sys.executable, str(FILL), "--data-dir", str(data_dir), "--json", str(out),
                    "--chunk", "150", *args], check=True, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def query(c, tenant: str, sql: str) -> list[dict]:
    req = pb.QueryRequest(shard=c.shard_for(tenant), sql=sql, tenant=tenant)
    return [msgspec.msgpack.decode(r.msgpack) for r in c.stub.Query(req, timeout=60).rows]


def test_filled_dir_opens_with_its_jobs_queryable(tmp_path):
    data = tmp_path / "data"
    r = fill(data, "--jobs", "2000", "--tenant", "acme", "--tenancy", "--groups", "3")
    assert r["jobs"] == 2000 and sum(r["counts"].values()) == 2000
    assert all(r["counts"][s] > 0 for s in ("Succeeded", "Failed", "Cancelled", "Waiting",
                                             "Scheduled"))
    with Server(data, "--tenancy") as s:
        c = s.client()
        assert len(c.owners) == 8  # the bench servers' shard count
        t = "acme"
        rows = query(c, t, "SELECT status_kind, COUNT(*) AS n FROM jobs WHERE tenant = 'acme' "
                           "GROUP BY status_kind")
        assert {x["status_kind"]: x["n"] for x in rows} == r["counts"]
        # the same from the rows themselves, not the counters
        rows = query(c, t, "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' "
                           "AND priority >= 0")
        assert rows == [{"n": 2000}]
        rows = query(c, t, "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' AND "
                           "array_contains(element_at(metadata, 'customer'), 'c1')")
        assert rows == [{"n": 1000}]  # ~1,000 jobs share a value (here N/1000 = 2 values)
        rows = query(c, t, "SELECT id FROM jobs WHERE tenant = 'acme' AND "
                           "array_contains(element_at(metadata, 'user'), 'u42')")
        assert rows == [{"id": "j0000042"}]
        rows = query(c, t, "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' AND "
                           "starts_with(array_any_value(element_at(metadata, 'batch')), "
                           "'b000004')")
        assert rows == [{"n": 10}]
        rows = query(c, t, "SELECT task_group, COUNT(*) AS n FROM jobs WHERE tenant = 'acme' "
                           "GROUP BY task_group ORDER BY task_group")
        assert [x["task_group"] for x in rows] == ["g0", "g1", "g2"]
        job = c.get("j0000042", "acme", attempts=True)
        assert job.id == "j0000042" and job.metadata["user"] == "u42"
        # a second fill adds jobs after the first ones, on the same shard map
        c.channel.close()
    r2 = fill(data, "--jobs", "300", "--start", "2000", "--tenant", "acme", "--tenancy")
    with Server(data, "--tenancy") as s:
        c = s.client()
        rows = query(c, "acme", "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' "
                                "AND priority >= 0")
        assert rows == [{"n": 2300}]
        waiting = r["counts"]["Waiting"] + r2["counts"]["Waiting"]
        rows = query(c, "acme", "SELECT COUNT(*) AS n FROM jobs WHERE tenant = 'acme' "
                                "AND status_kind = 'Waiting'")
        assert rows == [{"n": waiting}]
        c.channel.close()


def test_queued_only_fill_is_leasable_without_tenancy(tmp_path):
    data = tmp_path / "data"
    r = fill(data, "--jobs", "500", "--queued-only")
    assert r["counts"]["Waiting"] == 500 and r["tenant"] == "-"
    with Server(data, "--no-tenancy") as s:
        c = s.client()
        rows = query(c, "-", "SELECT status_kind, task_group, COUNT(*) AS n FROM jobs "
                             "GROUP BY status_kind, task_group")
        assert rows == [{"status_kind": "Waiting", "task_group": "bench", "n": 500}]
        tasks = c.lease(50, group="bench")
        assert len(tasks) == 50
        for task in tasks:
            c.succeed(task)
        c.channel.close()
