"""A data dir written by the first release (layout 1) opens under this one, jobs intact.

tests/fixtures/layout1 was written by the code before the query/expiry indexes (see
tests/fixtures/make_layout1.py); it is copied so the test never changes the fixture.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "layout1"

EXPECTED = {
    "old-scheduled": pb.JOB_STATUS_SCHEDULED,
    "old-future": pb.JOB_STATUS_SCHEDULED,
    "old-succeeded": pb.JOB_STATUS_SUCCEEDED,
    "old-failed": pb.JOB_STATUS_FAILED,
    "old-cancelled": pb.JOB_STATUS_CANCELLED,
    "old-other": pb.JOB_STATUS_SCHEDULED,
}


def test_layout1_data_dir_opens_with_its_jobs(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    with Server(data, "--processes", "1") as srv:
        c = srv.client()
        assert len(c.owners) == 2  # the persisted shard map, not a fresh one
        for job_id, status in EXPECTED.items():
            job = c.get(job_id, attempts=True)
            assert job.status == status, job_id
        assert c.get("old-scheduled").metadata["src"] == "fixture"
        assert c.get("old-scheduled").payload.msgpack == b"\xa1s"
        done = c.get("old-succeeded", attempts=True)
        assert done.result.msgpack == b"\xa2ok" and len(done.attempts) == 1
        failed = c.get("old-failed", attempts=True)
        assert failed.attempts[0].error_code == "BOOM"
        # The old queue still works: the due job is leased and completes.
        tasks = c.lease(10)
        assert [t.job_id for t in tasks] == ["old-scheduled"]
        c.succeed(tasks[0])
        assert c.get("old-scheduled").status == pb.JOB_STATUS_SUCCEEDED
        c.channel.close()


def test_layout1_finished_jobs_expire_once_retention_is_on(tmp_path):
    """Old finished jobs have no expiry rows; the first sweep gives them one."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    with Server(data, "--processes", "1", "--completed-job-expire-s", "1",
                "--terminal-job-expire-s", "1", "--reaper-interval-ms", "100") as srv:
        c = srv.client()
        finished = [j for j, s in EXPECTED.items() if s != pb.JOB_STATUS_SCHEDULED]
        deadline = time.monotonic() + 30
        for job_id in finished:
            while True:
                try:
                    c.get(job_id)
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.NOT_FOUND
                    break
                assert time.monotonic() < deadline, job_id
                time.sleep(0.1)
        for job_id, status in EXPECTED.items():
            if status == pb.JOB_STATUS_SCHEDULED:
                assert c.get(job_id).status == status
        c.channel.close()
