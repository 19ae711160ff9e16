"""Request fuzzer for the stream extension (proto/silo_stream.proto), beside test_fuzz.py.

EnqueueMany gets random EnqueueManyRequest messages (their jobs are silo.v1 Enqueue
requests built from the descriptors, often routed to a real shard) and raw bytes. The
Work stream gets random WorkerUp sequences, malformed first messages and raw bytes,
and a lifecycle where the worker answers the tasks pushed to it with random outcomes,
heartbeats and give-backs of real task ids.

Rules, as for silo.v1: every call ends with a status other than UNKNOWN (nor INTERNAL,
except grpcio's own for a client write that raced the server's end), and so does
every per-item status the extension reports inside a message (EnqueueResult.error,
Ack.error); a half-closed Work stream ends by itself (never by the deadline); no
traceback reaches the server log; the server still answers afterwards. Whether a task
arrives within a read's wait only changes what the fuzz reaches, never what it checks.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silo._proto import silo_pb2 as pb
from silo._proto import silo_stream_pb2 as spb
from tests.integration.harness import Server
from tests.integration.test_fuzz import (
    _FUZZ,
    _TEXT,
    _U32,
    GROUPS,
    SEEN,
    TENANTS,
    assert_healthy,
    channel,
    message,
    plausible_enqueue,
)

SERVICE = spb.DESCRIPTOR.services_by_name["SiloStream"]
ENQUEUE_MANY = f"/{SERVICE.full_name}/EnqueueMany"
WORK = f"/{SERVICE.full_name}/Work"
CALL_TIMEOUT = 15.0
READ_WAIT = 0.3  # how long the lifecycle waits for a pushed task (coverage only)
UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
# What grpcio's client reports when its write races the server ending the call (the
# server had answered e.g. INVALID_ARGUMENT): made on this side, not by the server.
_CORE_WRITE_ERROR = "Internal error from Core"


@pytest.fixture(scope="module")
def stream_server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("fuzz-stream"), "--tenancy", "--shards", "4",
                "--processes", "2", "--lease-ms", "1000", "--reaper-interval-ms", "100") as s:
        yield s
        assert_healthy(s)
        print("\nstream fuzz statuses:", sorted(k for k in SEEN.items() if k[0][0].startswith("@")))


@pytest.fixture(scope="module")
def shards(stream_server) -> list[str]:
    c = stream_server.client()
    yield [o.shard_id for o in c.owners]
    c.channel.close()


def no_traceback(server: Server) -> None:
    tracebacks = [line for line in server.log if "Traceback" in line]
    assert not tracebacks, "".join(server.log[-40:])


def seen(what: str, code: grpc.StatusCode) -> None:
    SEEN[("@" + what, code.name)] += 1


def _check_enqueue_results(body: bytes) -> None:
    for r in spb.EnqueueManyResponse.FromString(body).results:
        if r.HasField("error"):
            assert r.error.code not in (0, UNKNOWN), r.error
            assert len(r.error.message) <= 1100


def enqueue_many(server: Server, body: bytes) -> None:
    """One EnqueueMany of raw bytes: a clear status, clear per-job errors."""
    try:
        reply = channel(server).unary_unary(ENQUEUE_MANY)(body, timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        seen("EnqueueMany", e.code())
        assert e.code() != grpc.StatusCode.UNKNOWN, (e.details(), body[:200])
        assert len(e.details() or "") <= 1100
    else:
        seen("EnqueueMany", grpc.StatusCode.OK)
        _check_enqueue_results(reply)
    no_traceback(server)


def _check_down(body: bytes) -> spb.WorkerDown:
    down = spb.WorkerDown.FromString(body)
    for ack in down.acks:
        if ack.HasField("error"):
            assert ack.error.code not in (0, UNKNOWN), ack
            assert len(ack.error.message) <= 1100
    return down


async def _work(server: Server, ups: list[bytes], *, react=None) -> grpc.StatusCode:
    """One Work stream: write `ups`, then (react) answer pushed tasks for a while, then
    half-close and read to the end. Returns the status the stream ended with.

    One task reads the stream into a queue (a read cancelled by a timeout would cancel
    the call); react(call, queue) takes WorkerDown messages from it, None at the end."""
    async with grpc.aio.insecure_channel(server.addr) as ch:
        call = ch.stream_stream(WORK)(timeout=CALL_TIMEOUT)
        down: asyncio.Queue[spb.WorkerDown | None] = asyncio.Queue()

        async def read_all() -> None:
            try:
                while (body := await call.read()) is not grpc.aio.EOF:
                    down.put_nowait(_check_down(body))
            except grpc.aio.AioRpcError:
                pass
            finally:
                down.put_nowait(None)

        reader = asyncio.create_task(read_all())
        write_failed = False
        try:
            for body in ups:
                await call.write(body)
            if react is not None:
                await react(call, down)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            write_failed = True  # the server ended the call first
        await reader
        code = await call.code()
        details = await call.details()
    if write_failed and (code, details) == (grpc.StatusCode.INTERNAL, _CORE_WRITE_ERROR):
        return code  # the client's own status for a write racing the server's end
    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.INTERNAL), (code, details, [u[:100] for u in ups])
    assert len(details or "") <= 1100
    return code


@st.composite
def subscribe(draw, shards: list[str]) -> spb.WorkerUp:
    """A first message that usually subscribes properly, sometimes with edge values."""
    up = spb.WorkerUp()
    sub = up.subscribe
    sub.worker_id = draw(st.one_of(st.just("fw"), _TEXT))
    sub.task_group = draw(st.one_of(st.sampled_from(GROUPS), _TEXT))
    sub.slots = draw(st.one_of(st.integers(0, 5), _U32))
    if draw(st.booleans()):
        sub.shard = draw(st.one_of(st.sampled_from(shards), _TEXT))
    return up


def _first(shards: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        subscribe(shards).map(lambda m: m.SerializeToString()),
        message(spb.WorkerUp.DESCRIPTOR, shards).map(lambda m: m.SerializeToString()),
        st.binary(max_size=64),
        st.just(b"\x0a\xff\xff\xff\xff\x0f"),  # absurd length
    )


def test_fuzz_enqueue_many_messages(stream_server, shards):
    @_FUZZ
    @given(message(spb.EnqueueManyRequest.DESCRIPTOR, shards))
    def run(req):
        enqueue_many(stream_server, req.SerializeToString())

    run()


@settings(_FUZZ, max_examples=40)
@given(st.data())
def test_fuzz_enqueue_many_plausible(stream_server, shards, data):
    """Jobs that mostly pass validation, routed to their tenant's shard, mixed with
    invalid ones: each job's result must be an id or a clear error."""
    client = stream_server.client()
    try:
        req = spb.EnqueueManyRequest()
        for _ in range(data.draw(st.integers(0, 6))):
            tenant = data.draw(st.sampled_from(TENANTS))
            job = req.jobs.add()
            job.CopyFrom(data.draw(plausible_enqueue()))
            job.tenant = tenant
            job.shard = data.draw(st.sampled_from([client.shard_for(tenant)] + shards))
            job.task_group = data.draw(st.sampled_from(GROUPS))
        enqueue_many(stream_server, req.SerializeToString())
    finally:
        client.channel.close()


@settings(_FUZZ, max_examples=60)
@given(st.binary(max_size=300))
def test_fuzz_enqueue_many_raw_bytes(stream_server, body):
    enqueue_many(stream_server, body)


@settings(_FUZZ, max_examples=40)
@given(st.data())
def test_fuzz_work_messages(stream_server, shards, data):
    """A first message of any shape, then random WorkerUp messages (random task ids,
    outcomes, slots, stop), then a half-close."""
    first = data.draw(_first(shards))
    rest = data.draw(st.lists(st.one_of(
        message(spb.WorkerUp.DESCRIPTOR, shards).map(lambda m: m.SerializeToString()),
        st.binary(max_size=40)), max_size=3))
    code = asyncio.run(_work(stream_server, [first, *rest]))
    seen("Work", code)
    no_traceback(stream_server)


async def _answer(call, down: asyncio.Queue, reactions: list[tuple[str, bytes, str]],
                  extra: list[bytes]) -> None:
    """Answer each pushed task with the next reaction (real task id, random fields)."""
    pending = list(reactions)
    for _ in range(4):
        try:
            msg = await asyncio.wait_for(down.get(), READ_WAIT)
        except TimeoutError:
            break
        if msg is None:
            return
        SEEN[("@Work(lifecycle)", "tasks pushed")] += len(msg.tasks)
        for task in msg.tasks:
            await call.write(_reaction(task, *(pending.pop(0) if pending
                                               else ("none", b"", ""))))
    for body in extra:
        await call.write(body)


def _reaction(task: pb.Task, kind: str, data: bytes, text: str) -> bytes:
    """One WorkerUp answering a pushed task."""
    up = spb.WorkerUp(add_slots=1)
    if kind in ("success", "failure", "cancelled"):
        out = up.outcomes.add(shard=task.shard, task_id=task.id, tenant_id=task.tenant_id)
        if kind == "success":
            out.success.msgpack = data
        elif kind == "failure":
            out.failure.code = text
            out.failure.data.msgpack = data
        else:
            out.cancelled.SetInParent()
    elif kind == "heartbeat":
        up.heartbeats.add(shard=task.shard, worker_id=text or "fw", task_id=task.id,
                          tenant_id=task.tenant_id)
    elif kind == "give_back":
        up.give_back.add(shard=task.shard, task_id=task.id, tenant_id=task.tenant_id)
    elif kind == "twice":  # the same outcome twice in one message
        for _ in range(2):
            up.outcomes.add(shard=task.shard, task_id=task.id,
                            tenant_id=task.tenant_id).success.msgpack = data
    return up.SerializeToString()


@settings(_FUZZ, max_examples=30)
@given(st.data())
def test_fuzz_work_lifecycle(stream_server, shards, data):
    """Jobs enqueued through EnqueueMany, then a Work stream that answers what it is
    pushed: outcomes, heartbeats (some under another worker id), give-backs, a double
    outcome, or nothing (left to expire), then random messages, stop or a half-close."""
    client = stream_server.client()
    try:
        group_ = data.draw(st.sampled_from(GROUPS))
        req = spb.EnqueueManyRequest()
        for _ in range(data.draw(st.integers(1, 4))):
            tenant = data.draw(st.sampled_from(TENANTS))
            job = req.jobs.add()
            job.CopyFrom(data.draw(plausible_enqueue()))
            job.tenant, job.shard, job.task_group = tenant, client.shard_for(tenant), group_
        enqueue_many(stream_server, req.SerializeToString())
    finally:
        client.channel.close()
    sub = spb.WorkerUp()
    sub.subscribe.worker_id, sub.subscribe.task_group = "fw", group_
    sub.subscribe.slots = data.draw(st.integers(1, 4))
    reactions = data.draw(st.lists(st.tuples(
        st.sampled_from(["success", "failure", "cancelled", "heartbeat", "give_back",
                         "twice", "none"]),
        st.binary(max_size=16), st.one_of(st.just(""), _TEXT)), max_size=6))
    extra = data.draw(st.lists(st.one_of(
        message(spb.WorkerUp.DESCRIPTOR, shards).map(lambda m: m.SerializeToString()),
        st.just(spb.WorkerUp(stop=True).SerializeToString())), max_size=2))

    async def react(call, down):
        await _answer(call, down, reactions, extra)

    code = asyncio.run(_work(stream_server, [sub.SerializeToString()], react=react))
    seen("Work(lifecycle)", code)
    no_traceback(stream_server)


def test_undecodable_bodies_are_invalid_argument(stream_server):
    """Found by this fuzzer: the stream service was registered with grpcio's generated
    deserializers, so a body that did not parse ended UNKNOWN ("Unexpected DecodeError")
    with a traceback in the log, for EnqueueMany and for any WorkerUp of a Work stream."""
    with pytest.raises(grpc.RpcError) as e:
        channel(stream_server).unary_unary(ENQUEUE_MANY)(b"\x00", timeout=CALL_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid silostream.v1.EnqueueManyRequest" in e.value.details()
    sub = spb.WorkerUp()
    sub.subscribe.worker_id, sub.subscribe.task_group = "fw", "undecodable"

    async def ends_with(ups: list[bytes]) -> tuple[grpc.StatusCode, str]:
        """Write ups and wait for the server to end the call (no half-close: the last
        body alone must end it)."""
        async with grpc.aio.insecure_channel(stream_server.addr) as ch:
            call = ch.stream_stream(WORK)(timeout=CALL_TIMEOUT)
            for body in ups:
                await call.write(body)
            return await call.code(), await call.details()

    for ups in ([b"\n\xff\xff\xff\xff\x0f"], [sub.SerializeToString(), b"\x00"]):
        code, details = asyncio.run(ends_with(ups))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert "not a valid silostream.v1.WorkerUp" in details
    no_traceback(stream_server)


def test_server_answers_after_the_stream_fuzz(stream_server):
    """Last: the silo.v1 service still works (an enqueue, a lease of it)."""
    c = stream_server.client()
    try:
        jid = c.enqueue(tenant=TENANTS[0], task_group="after-fuzz")
        assert c.get(jid, tenant=TENANTS[0]).status == pb.JOB_STATUS_SCHEDULED
    finally:
        c.channel.close()
    assert_healthy(stream_server)
