"""Lease expiry: a task whose worker stopped heartbeating is failed as WORKER_CRASHED.

The expiry heap is in memory (rebuilt at open from the stored leases: Running index
rows, older 0x06 rows), so a reaper pass costs nothing when no lease is due. An
expired attempt of a job with a cancel request ends Cancelled; otherwise it fails and
follows the normal retry policy.
"""

from __future__ import annotations

import heapq
import logging

from silo import errors
from silo.observability import events
from silo.shard import limits
from silo.shard.outcome import Cancelled, crash_outcome, finish_attempt
from silo.shard.state import Shard
from silo.storage.records import RunAttempt

log = logging.getLogger(__name__)


async def reap_expired_leases(shard: Shard) -> int:
    """End every lease whose expiry has passed; return how many were reaped."""
    now = shard.now()
    heap = shard.lease_expiry
    due = []
    while heap and heap[0][0] <= now:
        expiry, task_id = heapq.heappop(heap)
        lease = shard.leases.get(task_id)
        if lease is not None and lease.expiry_ms == expiry:
            due.append(lease)
    reaped = 0
    for lease in due:
        task = lease.task
        if shard.leases.get(task.task_id) is not lease:
            continue  # renewed or reported meanwhile
        if not isinstance(task, RunAttempt):
            limits.refresh_expired(shard, task)
            reaped += 1
            continue
        job = shard.active.get((task.tenant, task.job_id))
        outcome = (Cancelled() if job is not None and job.cancelled_at_ms is not None
                   else crash_outcome(lease, now))
        try:
            await finish_attempt(shard, lease, outcome)
        except errors.SiloError:
            continue  # the worker reported while we read the job
        reaped += 1
        events.lease_expired(shard.id, task.task_id, task.job_id, task.attempt,
                             lease.worker_id)
    if reaped:
        await shard.committer.commit()
    return reaped
