"""The limit chain: concurrency slots, parked waiters, grants, and rate-limit checks.

Each attempt of a job walks its limits in the order the caller gave, from index 0:

* concurrency limit (tenant, key) with the job's own max N: if the job is due and the
  queue has fewer than N holders, it takes a slot (a holder row keyed by the attempt's
  task id) and goes on; if it is due and the queue is full, it parks as a waiter; if
  it is not due yet, a RequestTicket task waits in the ready queue until it is, so
  future jobs never hold slots early;
* rate limit: a CheckRateLimit task is checked against the shard's local limiter when
  due; over the limit it waits (reset time or back-off) and fails the job with
  RATE_LIMITED once its max_retries are spent;
* when the end is reached, a RunAttempt carrying every held queue goes to the ready
  queue at the job's start time (so a granted job goes to the front).

Releasing a slot (any end of an attempt, a retry, a cancel, DropTenantHolders) grants
the queue's waiters at once, in (start time, priority, job id) order, in the same
synchronous step: a waiter is leasable as soon as the release is durable. Everything
here is synchronous and stages its writes; callers await the batch.
"""

from __future__ import annotations

import heapq
import logging

from silo import errors
from silo.ids import new_id
from silo.observability import metrics, tracing
from silo.shard import ratelimit
from silo.shard.state import ActiveJob, Shard
from silo.shard.validate import validate_limits  # noqa: F401  (re-exported)
from silo.storage import keys
from silo.storage.records import (
    ATTEMPT_FAILED,
    FAILED,
    SCHEDULED,
    Attempt,
    CheckRateLimit,
    ConcurrencyLimit,
    FloatingConcurrencyLimit,
    FloatingLimitState,
    JobStatus,
    Limit,
    RateLimit,
    RefreshFloatingLimit,
    RequestTicket,
    RunAttempt,
    encode,
    encode_i64,
)

log = logging.getLogger(__name__)

RATE_LIMITED = "RATE_LIMITED"
# Error code of an attempt failed because a step of its limit chain raised (a record the
# server cannot process, e.g. stored before Enqueue validated its numbers).
BROKEN_CHAIN = "INVALID_JOB"


class Chain:
    """Where one attempt's walk through its limits stands."""

    __slots__ = ("task_id", "tenant", "job_id", "attempt", "relative", "task_group",
                 "priority", "start_ms", "limits", "held")

    def __init__(self, task_id: str, tenant: str, job_id: str, attempt: int, relative: int,
                 task_group: str, priority: int, start_ms: int, limits: list[Limit],
                 held: list[str]) -> None:
        self.task_id = task_id
        self.tenant = tenant
        self.job_id = job_id
        self.attempt = attempt
        self.relative = relative
        self.task_group = task_group
        self.priority = priority
        self.start_ms = start_ms
        self.limits = limits
        self.held = held

    @classmethod
    def of(cls, t, held: list[str] | None = None) -> Chain:
        """Resume a chain from a RequestTicket or CheckRateLimit record."""
        return cls(t.task_id, t.tenant, t.job_id, t.attempt, t.relative_attempt,
                   t.task_group, t.priority, t.start_ms, t.limits,
                   list(t.held_queues) if held is None else held)

    def _step(self, index: int) -> dict:
        return dict(task_id=self.task_id, tenant=self.tenant, job_id=self.job_id,
                    attempt=self.attempt, relative_attempt=self.relative,
                    task_group=self.task_group, held_queues=list(self.held), limit_index=index,
                    priority=self.priority, start_ms=self.start_ms, limits=self.limits)

    def ticket(self, index: int, queue: str) -> RequestTicket:
        return RequestTicket(**self._step(index), queue=queue)

    def rate_check(self, index: int, retry_count: int) -> CheckRateLimit:
        return CheckRateLimit(**self._step(index), retry_count=retry_count)

    def task_key(self) -> bytes:
        return keys.task(self.task_group, self.start_ms, self.priority, self.job_id,
                         self.attempt, self.tenant)


def start_attempt(shard: Shard, job: ActiveJob, *, tenant: str, job_id: str, attempt: int,
                  relative: int, task_group: str, priority: int, start_ms: int,
                  limits: list[Limit], now: int, retry: bool = False) -> None:
    """Begin the limit chain of a new attempt (enqueue, retry, restart)."""
    if not limits:  # = walk's end for an empty chain, without building the Chain
        _place_task(shard, job, keys.task(task_group, start_ms, priority, job_id, attempt,
                                          tenant),
                    RunAttempt(new_id(), tenant, job_id, attempt, relative, task_group, []))
        return
    chain = Chain(new_id(), tenant, job_id, attempt, relative, task_group, priority, start_ms,
                  limits, [])
    walk(shard, job, chain, 0, now, join_queue=retry)


def walk(shard: Shard, job: ActiveJob, chain: Chain, index: int, now: int,
         join_queue: bool = False) -> None:
    """Go through limits[index:], stopping at the first that makes the attempt wait.

    join_queue: a retry's first concurrency limit queues behind the waiters instead of
    taking a free slot directly (the slot it released may already be owed to them).
    """
    limits = chain.limits
    for i in range(index, len(limits)):
        limit = limits[i]
        if isinstance(limit, ConcurrencyLimit | FloatingConcurrencyLimit):
            queue = limit.key
            if chain.start_ms > now:
                _add_chain_task(shard, job, chain, chain.ticket(i, queue))
                return
            q = shard.concurrency_queue(chain.tenant, queue)
            if isinstance(limit, FloatingConcurrencyLimit):
                floating_state(shard, chain.tenant, limit, now)
            if not join_queue and len(q.holders) < capacity(shard, chain.tenant, limit):
                hold(shard, chain.tenant, queue, chain.task_id, now)
                metrics.CONC_GRANTED.inc((shard.id, "immediate"))
                chain.held.append(queue)
                continue
            park(shard, job, chain, i, queue)
            if join_queue:
                grant(shard, chain.tenant, queue, now)
            if isinstance(limit, FloatingConcurrencyLimit):
                maybe_schedule_refresh(shard, chain.tenant, queue, chain.task_group, now)
            return
        if isinstance(limit, RateLimit):
            _add_chain_task(shard, job, chain, chain.rate_check(i, 0))
            return
    _add_chain_task(shard, job, chain, RunAttempt(
        chain.task_id, chain.tenant, chain.job_id, chain.attempt, chain.relative,
        chain.task_group, list(chain.held)))


def capacity(shard: Shard, tenant: str, limit: ConcurrencyLimit | FloatingConcurrencyLimit
             ) -> int:
    """A fixed limit's max is the job's own; a floating one's is the shared current max."""
    if isinstance(limit, ConcurrencyLimit):
        return limit.max_concurrency
    st = shard.floating.get((tenant, limit.key))
    return st.current_max if st is not None else limit.default_max_concurrency


def _add_chain_task(shard: Shard, job: ActiveJob, chain: Chain, task) -> None:
    _place_task(shard, job, chain.task_key(), task)


def _place_task(shard: Shard, job: ActiveJob, key: bytes, task) -> None:
    """The job's pending step is now the task under key (no ticket row any more)."""
    shard.add_task(key, task)
    job.task_key = key
    job.request_key = None


# ---- holders and waiters ---------------------------------------------------------


def hold(shard: Shard, tenant: str, queue: str, task_id: str, now: int) -> None:
    shard.concurrency_queue(tenant, queue).holders.add(task_id)
    shard.committer.put(keys.concurrency_holder(tenant, queue, task_id), encode_i64(now))


def park(shard: Shard, job: ActiveJob, chain: Chain, index: int, queue: str) -> None:
    key = keys.concurrency_request(chain.tenant, queue, chain.start_ms, chain.priority,
                                   chain.job_id, chain.attempt)
    ticket = chain.ticket(index, queue)
    shard.committer.put(key, encode(ticket))
    shard.index_request(key, ticket)
    job.task_key = None
    job.request_key = key


def unpark(shard: Shard, key: bytes) -> RequestTicket | None:
    """Remove a parked waiter (its heap entry is skipped lazily)."""
    ticket = shard.requests.pop(key, None)
    shard.committer.delete(key)
    return ticket


@tracing.traced("concurrency.release", when=lambda shard, tenant, queues, *a: bool(queues))
def release(shard: Shard, tenant: str, queues: list[str], task_id: str, now: int) -> None:
    """Free the slots an attempt held and grant each queue's waiters."""
    for queue in queues:
        q = shard.concurrency_queue(tenant, queue)
        q.holders.discard(task_id)
        shard.committer.delete(keys.concurrency_holder(tenant, queue, task_id))
    for queue in queues:
        grant(shard, tenant, queue, now)


@tracing.traced("concurrency.grant")
def grant(shard: Shard, tenant: str, queue: str, now: int) -> int:
    """Grant waiters of one queue in order while the head waiter's own max allows."""
    q = shard.conc.get((tenant, queue))
    if q is None:
        return 0
    granted = 0
    while q.waiting:
        key = q.waiting[0]
        ticket = shard.requests.get(key)
        if ticket is None:
            heapq.heappop(q.waiting)
            continue
        limit = ticket.limits[ticket.limit_index]
        assert isinstance(limit, ConcurrencyLimit | FloatingConcurrencyLimit)
        if len(q.holders) >= capacity(shard, tenant, limit):
            break
        heapq.heappop(q.waiting)
        unpark(shard, key)
        job = shard.active.get((tenant, ticket.job_id))
        if job is None or job.request_key != key:
            continue  # stale waiter: nothing to resume
        hold(shard, tenant, queue, ticket.task_id, now)
        granted += 1
        try:
            walk(shard, job, Chain.of(ticket, list(ticket.held_queues) + [queue]),
                 ticket.limit_index + 1, now)
        except Exception as exc:  # one broken waiter must not stop the others' grants
            fail_broken_chain(shard, job, ticket, now, exc, granting=queue)
        shard.settle(tenant, ticket.job_id, job)
    if not q.waiting and not q.holders and shard.conc.get((tenant, queue)) is q:
        del shard.conc[(tenant, queue)]
    if granted:
        metrics.CONC_GRANTED.inc((shard.id, "scanned"), granted)
    return granted


# ---- floating concurrency limits -----------------------------------------------------


def floating_state(shard: Shard, tenant: str, limit: FloatingConcurrencyLimit,
                   now: int) -> FloatingLimitState:
    """The shared state of (tenant, key); the first job using the key creates it."""
    st = shard.floating.get((tenant, limit.key))
    if st is None:
        st = FloatingLimitState(limit.default_max_concurrency, 0, False,
                                limit.refresh_interval_ms, limit.default_max_concurrency, 0,
                                None, dict(limit.metadata))
        _put_floating(shard, tenant, limit.key, st)
    return st


def _put_floating(shard: Shard, tenant: str, queue: str, st: FloatingLimitState) -> None:
    shard.floating[(tenant, queue)] = st
    shard.committer.put(keys.floating_limit(tenant, queue), encode(st))


def maybe_schedule_refresh(shard: Shard, tenant: str, queue: str, task_group: str,
                           now: int) -> None:
    """Hand workers a refresh task when the max is stale and someone is waiting."""
    st = shard.floating.get((tenant, queue))
    q = shard.conc.get((tenant, queue))
    if st is None or st.refresh_scheduled or q is None or not q.waiting:
        return
    if now < st.last_refreshed_at_ms + st.refresh_interval_ms:
        return
    if st.next_retry_at_ms is not None and now < st.next_retry_at_ms:
        return
    _schedule_refresh(shard, tenant, queue, st, task_group, now)


def _schedule_refresh(shard: Shard, tenant: str, queue: str, st: FloatingLimitState,
                      task_group: str, at: int) -> None:
    task = RefreshFloatingLimit(new_id(), tenant, queue, st.current_max,
                                st.last_refreshed_at_ms, dict(st.metadata), task_group)
    shard.add_task(keys.task(task_group, at, 0, f"floating_refresh:{queue}", 0, tenant), task)
    st.refresh_scheduled = True
    _put_floating(shard, tenant, queue, st)


def refresh_succeeded(shard: Shard, task: RefreshFloatingLimit, new_max: int,
                      now: int) -> None:
    """A worker computed the new max: store it and grant waiters up to it."""
    if new_max < 1:
        raise errors.invalid("new_max_concurrency must be >= 1")
    shard.drop_lease(task.task_id)
    st = shard.floating.get((task.tenant, task.queue_key))
    if st is None:
        return
    st.current_max = new_max
    st.last_refreshed_at_ms = now
    st.refresh_scheduled = False
    st.retry_count = 0
    st.next_retry_at_ms = None
    _put_floating(shard, task.tenant, task.queue_key, st)
    grant(shard, task.tenant, task.queue_key, now)


def refresh_failed(shard: Shard, task: RefreshFloatingLimit, now: int) -> None:
    """Back off 1 s × 2^n (≤ 60 s); retry then only if jobs still wait."""
    shard.drop_lease(task.task_id)
    st = shard.floating.get((task.tenant, task.queue_key))
    if st is None:
        return
    st.next_retry_at_ms = now + min(1000 * 2**st.retry_count, 60_000)
    st.retry_count += 1
    q = shard.conc.get((task.tenant, task.queue_key))
    if q is not None and q.waiting:
        _schedule_refresh(shard, task.tenant, task.queue_key, st, task.task_group,
                          st.next_retry_at_ms)
    else:
        st.refresh_scheduled = False
        _put_floating(shard, task.tenant, task.queue_key, st)


def refresh_expired(shard: Shard, task: RefreshFloatingLimit) -> None:
    """The refreshing worker vanished: the next waiter will schedule a new refresh."""
    shard.drop_lease(task.task_id)
    st = shard.floating.get((task.tenant, task.queue_key))
    if st is not None:
        st.refresh_scheduled = False
        _put_floating(shard, task.tenant, task.queue_key, st)


def grant_all(shard: Shard, now: int) -> int:
    """Grant every queue's waiters (at open: a crash cannot strand a free slot)."""
    return sum(grant(shard, t, q, now) for t, q in list(shard.conc))


def drop_tenant_holders(shard: Shard, tenant: str, now: int) -> int:
    """Emergency: forget every slot of a tenant's queues; running attempts go on."""
    dropped = 0
    for (t, queue), q in list(shard.conc.items()):
        if t != tenant:
            continue
        for task_id in list(q.holders):
            shard.committer.delete(keys.concurrency_holder(t, queue, task_id))
            dropped += 1
        q.holders.clear()
        grant(shard, t, queue, now)
    return dropped


# ---- chain steps met in the ready queue --------------------------------------------


def resume_ticket(shard: Shard, job: ActiveJob, ticket: RequestTicket, now: int) -> None:
    """A RequestTicket became due: ask for its slot now (or park)."""
    walk(shard, job, Chain.of(ticket), ticket.limit_index, now)


def check_rate_limit(shard: Shard, job: ActiveJob, step, now: int) -> None:
    """A CheckRateLimit became due: pass, wait and re-check, or fail the job."""
    limit = step.limits[step.limit_index]
    assert isinstance(limit, RateLimit)
    bucket = (limit.name, limit.unique_key)
    decision = ratelimit.check(shard.rate_buckets.get(bucket), limit=limit.limit,
                               duration_ms=limit.duration_ms, hits=limit.hits,
                               algorithm=limit.algorithm, now=now)
    shard.rate_buckets[bucket] = decision.state
    shard.committer.put(keys.rate_limit_bucket(*bucket), encode(decision.state))
    if decision.admitted:
        walk(shard, job, Chain.of(step), step.limit_index + 1, now)
        return
    policy = limit.retry_policy
    if policy.max_retries > 0 and step.retry_count >= policy.max_retries:
        _fail_rate_limited(shard, job, step, now)
        return
    at = ratelimit.next_check_ms(policy, step.retry_count, decision.reset_ms, now)
    chain = Chain.of(step)
    nxt = chain.rate_check(step.limit_index, step.retry_count + 1)
    # Re-queued at the retry time; the chain's own start time is kept inside it, and a
    # pointer row names the key (silo.shard.pending finds it from the job).
    key = keys.task(chain.task_group, at, chain.priority, chain.job_id,
                    chain.attempt, chain.tenant)
    shard.add_task(key, nxt)
    if at != chain.start_ms:
        shard.committer.put(keys.pending_pointer(chain.tenant, chain.job_id), key)
    job.task_key = key


def _fail_rate_limited(shard: Shard, job: ActiveJob, step, now: int) -> None:
    tenant, job_id = step.tenant, step.job_id
    text = f"rate limit {step.limits[step.limit_index].name!r} still exceeded after retries"
    shard.put_attempt(tenant, Attempt(job_id, step.attempt, step.relative_attempt,
                                      step.task_id, ATTEMPT_FAILED, now, now, None,
                                      RATE_LIMITED, encode(text)))
    shard.put_status(tenant, job_id, JobStatus(FAILED, now, last_attempt=step.attempt))
    shard.active.pop((tenant, job_id), None)
    shard.info_cache.discard(tenant, job_id)
    shard.count_status(tenant, SCHEDULED, FAILED)
    shard.count_jobs(completed=1)
    release(shard, tenant, list(step.held_queues), step.task_id, now)


def fail_broken_chain(shard: Shard, job: ActiveJob, step, now: int, exc: BaseException,
                      granting: str | None = None) -> None:
    """A step of this job's limit chain raised: end the job Failed (code INVALID_JOB)
    instead of leaving it half-moved, and give back whatever the step had taken.

    Whatever the partial step staged is undone or superseded here: a lease or a new
    pending task is dropped, every slot the attempt's task id may hold on the job's
    concurrency keys is freed, and the status is written Failed. `granting` is the queue
    whose grant loop called us (it goes on granting by itself). Never raises.
    """
    tenant, job_id, task_id = step.tenant, step.job_id, step.task_id
    log.error("job %s (tenant %s) failed: its limit chain cannot be processed: %r",
              job_id, tenant, exc, exc_info=exc)
    if shard.leases.get(task_id) is not None:
        shard.drop_lease(task_id)
    if job.task_key is not None:
        shard.remove_task(job.task_key, job.task)
        job.task_key = None
    if job.request_key is not None:
        unpark(shard, job.request_key)
        job.request_key = None
    queues = list(dict.fromkeys(
        list(getattr(step, "held_queues", None) or [])
        + [lim.key for lim in (getattr(step, "limits", None) or [])
           if isinstance(lim, ConcurrencyLimit | FloatingConcurrencyLimit)]))
    text = errors.clip(f"the job's limit chain cannot be processed: {exc!r}")
    attempt = getattr(step, "attempt", 0)
    shard.put_attempt(tenant, Attempt(job_id, attempt, getattr(step, "relative_attempt", 0),
                                      task_id, ATTEMPT_FAILED, now, now, None, BROKEN_CHAIN,
                                      encode(text)))
    shard.put_status(tenant, job_id, JobStatus(FAILED, now, last_attempt=attempt))
    if shard.active.get((tenant, job_id)) is job:
        del shard.active[(tenant, job_id)]
    shard.info_cache.discard(tenant, job_id)
    shard.count_status(tenant, job.kind, FAILED)
    shard.count_jobs(completed=1)
    for queue in queues:
        q = shard.conc.get((tenant, queue))
        if q is not None:
            q.holders.discard(task_id)
        shard.committer.delete(keys.concurrency_holder(tenant, queue, task_id))
    for queue in queues:
        if queue != granting:
            grant(shard, tenant, queue, now)


def abandon_pending(shard: Shard, tenant: str, job: ActiveJob, now: int) -> list[str]:
    """Drop a Scheduled job's pending task or parked request, releasing its slots.

    Returns the queues it held (already released). Used by cancel and LeaseTask.
    """
    held: list[str] = []
    task_id = ""
    if job.request_key is not None:
        ticket = unpark(shard, job.request_key)
        job.request_key = None
        if ticket is not None:
            held, task_id = list(ticket.held_queues), ticket.task_id
    elif job.task_key is not None:
        task = shard.remove_task(job.task_key, job.task)
        job.task_key = None
        if task is not None:
            held, task_id = list(getattr(task, "held_queues", [])), task.task_id
    if held:
        release(shard, tenant, held, task_id, now)
    return held
