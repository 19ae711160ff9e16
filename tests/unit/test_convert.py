"""silo.rpc.convert's in-place task builders give exactly the messages the keyword-argument
construction gave (they replaced it for speed, not for a different wire shape)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from silo._proto import silo_pb2 as pb
from silo.rpc import convert
from silo.shard.lease import LeasedTask
from silo.shard.retry import is_last_attempt
from silo.storage.records import (
    ConcurrencyLimit,
    JobInfo,
    Lease,
    RateLimit,
    RateLimitRetryPolicy,
    RefreshFloatingLimit,
    RetryPolicy,
    RunAttempt,
)

text = st.text(max_size=8)
limits = st.lists(st.one_of(
    st.builds(ConcurrencyLimit, text, st.integers(1, 9)),
    st.builds(RateLimit, text, text, st.integers(1, 9), st.integers(1, 9), st.integers(0, 9),
              st.integers(0, 1), st.integers(0, 1), st.just(RateLimitRetryPolicy()))),
    max_size=3)


def reference_task(leased: LeasedTask, shard_id: str, lease_ms: int) -> pb.Task:
    """The construction convert.task_to_pb used before fill_task."""
    lease, info = leased
    t = lease.task
    m = pb.Task(
        id=t.task_id, job_id=t.job_id, attempt_number=t.attempt,
        relative_attempt_number=t.relative_attempt,
        is_last_attempt=is_last_attempt(info.retry_policy, t.relative_attempt),
        metadata=info.metadata, limits=[convert.limit_to_pb(x) for x in info.limits],
        payload=convert.serialized(info.payload), priority=info.priority, shard=shard_id,
        task_group=t.task_group, lease_ms=lease_ms)
    if t.tenant != convert.DEFAULT_TENANT:
        m.tenant_id = t.tenant
    return m


@given(tenant=st.sampled_from(["-", "t1"]), attempt=st.integers(1, 5),
       metadata=st.dictionaries(text, text, max_size=3), lims=limits,
       payload=st.binary(max_size=8), retries=st.none() | st.integers(0, 5),
       priority=st.integers(0, 99))
def test_fill_task_builds_the_same_message_as_keyword_construction(
        tenant, attempt, metadata, lims, payload, retries, priority):
    policy = None if retries is None else RetryPolicy(retries, 10, 100, False, 2.0)
    info = JobInfo("j", tenant, priority, 5, payload, policy, metadata, lims, "g")
    task = RunAttempt("t", tenant, "j", attempt, attempt, "g")
    leased = LeasedTask(Lease("w", task, 10, 5), info)
    got = pb.LeaseTasksResponse()
    convert.fill_task(got.tasks.add(), leased, "s", 1000)
    want = reference_task(leased, "s", 1000)
    assert got.tasks[0] == want
    assert got.tasks[0].SerializeToString(deterministic=True) == \
        want.SerializeToString(deterministic=True)
    assert convert.task_to_pb(leased, "s", 1000) == want


@given(tenant=st.sampled_from(["-", "t1"]), metadata=st.dictionaries(text, text, max_size=3))
def test_fill_refresh_task_builds_the_same_message_as_keyword_construction(tenant, metadata):
    t = RefreshFloatingLimit("r", tenant, "q", 3, 7, metadata, "g")
    lease = Lease("w", t, 10, 5)
    want = pb.RefreshFloatingLimitTask(
        id="r", queue_key="q", current_max_concurrency=3, last_refreshed_at_ms=7,
        metadata=metadata, lease_ms=1000, shard="s", task_group="g")
    if tenant != "-":
        want.tenant_id = tenant
    got = convert.refresh_task_to_pb(lease, "s", 1000)
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def test_a_lease_reply_merges_into_a_worker_down_message_field_for_field():
    """work_session parses a relayed LeaseTasksResponse straight into its WorkerDown:
    both carry tasks as field 1 and refresh_tasks as field 2, of the same types."""
    from silo._proto import silo_stream_pb2 as spb  # noqa: PLC0415

    a = pb.LeaseTasksResponse.DESCRIPTOR.fields_by_name
    b = spb.WorkerDown.DESCRIPTOR.fields_by_name
    for name in ("tasks", "refresh_tasks"):
        assert a[name].number == b[name].number
        assert a[name].message_type is b[name].message_type


@given(st.dictionaries(text, text, max_size=6), st.booleans())
def test_map_to_dict_and_enqueue_fields_equal_the_plain_conversion(metadata, with_limit):
    """map_to_dict replaced dict(m) of a upb map for speed: same keys, values and order;
    enqueue_fields' empty-limit shortcut gives what limits_from_pb gives."""
    req = pb.EnqueueRequest(shard="s", task_group="g", metadata=metadata)
    if with_limit:
        req.limits.add().concurrency.key = "k"
    got = convert.map_to_dict(req.metadata)
    assert got == dict(req.metadata) and list(got) == list(dict(req.metadata))
    fields = convert.enqueue_fields(req)
    assert fields["metadata"] == dict(req.metadata)
    assert fields["limits"] == convert.limits_from_pb(req.limits)
    assert type(fields["limits"]) is list and type(fields["metadata"]) is dict


def reference_job(view) -> pb.GetJobResponse:
    """The construction convert.job_to_pb used before it wrote fields in place."""
    info, status = view.info, view.status
    m = pb.GetJobResponse(
        id=info.id, priority=info.priority, enqueue_time_ms=info.enqueue_time_ms,
        payload=convert.serialized(info.payload),
        limits=[convert.limit_to_pb(x) for x in info.limits],
        metadata=info.metadata, status=status.kind, status_changed_at_ms=status.changed_at_ms,
        attempts=[convert.attempt_to_pb(a) for a in view.attempts], task_group=info.task_group)
    if info.retry_policy is not None:
        m.retry_policy.CopyFrom(convert.retry_policy_to_pb(info.retry_policy))
    if status.next_attempt_starts_after_ms is not None:
        m.next_attempt_starts_after_ms = min(status.next_attempt_starts_after_ms, (1 << 63) - 1)
    if view.result is not None:
        m.result.msgpack = view.result
    return m


@given(metadata=st.dictionaries(text, text, max_size=3), lims=limits,
       payload=st.binary(max_size=8), retries=st.none() | st.integers(0, 5),
       kind=st.integers(0, 4), next_at=st.none() | st.integers(0, 1 << 64),
       n_attempts=st.integers(0, 2), result=st.none() | st.binary(max_size=4))
def test_job_to_pb_builds_the_same_message_as_keyword_construction(
        metadata, lims, payload, retries, kind, next_at, n_attempts, result):
    from silo.shard.get_job import JobView
    from silo.storage.records import Attempt, JobStatus

    policy = None if retries is None else RetryPolicy(retries, 10, 100, False, 2.0)
    info = JobInfo("j", "-", 7, 5, payload, policy, metadata, lims, "g")
    attempts = [Attempt("j", i, i, f"t{i}", 1, 10 + i, 20 + i, b"r", None, None)
                for i in range(1, n_attempts + 1)]
    view = JobView(info, JobStatus(kind, 9, next_at, 1, n_attempts), attempts, result)
    got, want = convert.job_to_pb(view), reference_job(view)
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(
        deterministic=True)
    assert got.HasField("payload")
