"""A pure Python model of one shard's job state machine, for tests/unit/test_shard_model.py.

It knows what behaviour.md says each operation does to one job (status, attempt numbers,
retry back-off, the cancel flag, lease expiry) and nothing about how the shard stores
it, so the stateful test can compare the two after every step. Which of several due
jobs a LeaseTasks call picks (ready order, concurrency grants) is the shard's choice:
the model does not predict it, it checks that the choice was legal and takes it over.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from silo.storage.records import (
    CANCELLED,
    FAILED,
    RUNNING,
    SCHEDULED,
    STATUS_NAMES,
    SUCCEEDED,
    TERMINAL,
    RetryPolicy,
)

# Each concurrency key has one max for every job using it (a job's own max is what
# upstream checks; one max per key keeps "never more than N holders" well defined).
KEY_MAX = {"k1": 1, "k2": 2}


@dataclass
class MJob:
    """What the model expects of one job."""

    tenant: str
    job_id: str
    group: str
    priority: int
    start_at_ms: int  # the job info's enqueue time (its first start; restart's floor)
    policy: RetryPolicy | None
    key: str | None  # concurrency key, if the job has a limit
    status: int = SCHEDULED
    ended: int = 0  # attempt rows written; the pending or running attempt is ended + 1
    relative: int = 1  # relative number of the pending or running attempt
    start_ms: int = 0  # when the pending attempt is due (Scheduled)
    task_id: str | None = None  # the lease (Running)
    worker: str = ""
    expiry_ms: int = 0
    started_ms: int = 0  # when the running attempt's lease began
    cancelled_at_ms: int | None = None  # cancel requested while Running
    holds: bool = False  # the running attempt holds its concurrency slot

    @property
    def ref(self) -> tuple[str, str]:
        return (self.tenant, self.job_id)


def retry_delay(policy: RetryPolicy, failures: int) -> int:
    """The back-off of behaviour.md's retry rule for the non-random policies used here
    (written out again rather than imported, so a slip in silo.shard.retry shows)."""
    raw = policy.initial_interval_ms * policy.backoff_factor ** failures
    return int(min(raw, policy.max_interval_ms) + 0.5) if raw > 0 else 0


class Model:
    """Every job of the shard, keyed by (tenant, job id)."""

    def __init__(self, lease_ms: int) -> None:
        self.lease_ms = lease_ms
        self.jobs: dict[tuple[str, str], MJob] = {}

    # ---- transitions --------------------------------------------------------------

    def enqueue(self, job: MJob, now: int) -> None:
        job.start_at_ms = job.start_at_ms if job.start_at_ms > 0 else now
        job.start_ms = job.start_at_ms
        self.jobs[job.ref] = job

    def start(self, job: MJob, task_id: str, worker: str, now: int, holds: bool) -> None:
        """Scheduled → Running under a new (or given back) lease."""
        assert job.status == SCHEDULED, job
        job.status = RUNNING
        job.task_id, job.worker, job.holds = task_id, worker, holds
        job.expiry_ms = now + self.lease_ms
        job.started_ms = now
        job.cancelled_at_ms = None

    def end(self, job: MJob, outcome: str, now: int) -> None:
        """A running attempt ends: outcome is success, failure, cancelled or crashed
        (the reaper's WORKER_CRASHED failure)."""
        assert job.status == RUNNING, job
        job.ended += 1
        cancelled = job.cancelled_at_ms is not None
        job.task_id, job.holds, job.cancelled_at_ms = None, False, None
        if outcome == "success":
            job.status = SUCCEEDED
        elif outcome == "cancelled" or cancelled:
            job.status = CANCELLED
        elif job.policy is not None and job.relative <= job.policy.retry_count:
            job.status = SCHEDULED
            job.start_ms = now + retry_delay(job.policy, job.relative)
            job.relative += 1
        else:
            job.status = FAILED

    def give_back(self, job: MJob) -> None:
        """An unstarted lease goes back: Scheduled at its start, no attempt counted
        (a job cancelled meanwhile ends Cancelled, as its worker would have reported)."""
        if job.cancelled_at_ms is not None:
            self.end(job, "cancelled", 0)
            return
        job.status = SCHEDULED
        job.task_id, job.holds = None, False
        job.start_ms = job.started_ms

    def restart(self, job: MJob, now: int) -> None:
        job.status = SCHEDULED
        job.relative = 1
        job.start_ms = max(job.start_at_ms, now)

    # ---- views --------------------------------------------------------------------

    def running(self) -> list[MJob]:
        return [j for j in self.jobs.values() if j.status == RUNNING]

    def counts(self) -> dict[tuple[str, str], int]:
        """(tenant, status name) → jobs, as Shard.tenant_status holds them (no zeros)."""
        return dict(Counter((j.tenant, STATUS_NAMES[j.status]) for j in self.jobs.values()))

    def completed(self) -> int:
        return sum(j.status in TERMINAL for j in self.jobs.values())

    def due(self, group: str, now: int) -> list[MJob]:
        return [j for j in self.jobs.values()
                if j.status == SCHEDULED and j.group == group and j.start_ms <= now]

    def slot_holders(self, tenant: str, key: str) -> set[str]:
        """Task ids of the running attempts that hold a slot of (tenant, key)."""
        return {j.task_id for j in self.running()
                if j.holds and j.tenant == tenant and j.key == key and j.task_id}
