"""Request fuzzer (issue 14): random silo.v1 requests and raw bytes against a real server.

Messages are built from the protobuf descriptors, so every request type and every
field is covered, including ones added later: random presence, huge / negative / NaN /
empty / unicode values, unknown enum numbers, nested limits and maps. String fields
that route (shard, tenant, task group, ids) are often real values so calls get past
routing into validation and the state machine. The server runs 2 worker processes
with tenancy on, so forwarded calls are fuzzed too.

Every answer must be a status other than UNKNOWN, no traceback may reach the server
log, and the server must still answer GetClusterInfo afterwards. Bounded to a few
seconds per request type (max_examples below; per-call deadline CALL_TIMEOUT): the
module takes 15-35 s on a 2-core box at load average 10-30.
"""

from __future__ import annotations

import collections

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server

SERVICE = pb.DESCRIPTOR.services_by_name["Silo"]
METHODS = list(SERVICE.methods)
CALL_TIMEOUT = 15.0
# CpuProfile/HeapProfile block for their duration (0 ⇒ 30 s, up to 300 s, as upstream):
# the fuzzer gives them a short deadline and only checks how they end.
SLOW_BY_DESIGN = {"CpuProfile": 1.0, "HeapProfile": 1.0}
TENANTS = ["acme", "globex", "t-3", "initech", "umbrella"]
GROUPS = ["g", "h"]
JOB_IDS = ["j1", "j2", "j3"]
# Numeric fields that would make a correct server wait (profiles): keep them short.
SHORT = {"duration_seconds", "frequency"}

# (method, status) → count, printed at the end (pytest -s) to see what the fuzz reached.
SEEN: collections.Counter[tuple[str, str]] = collections.Counter()

_FUZZ = settings(deadline=None, database=None, max_examples=25,
                 suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("fuzz"), "--tenancy", "--shards", "4",
                "--processes", "2", "--lease-ms", "1000", "--reaper-interval-ms", "100") as s:
        yield s
        ch = _CHANNELS.pop(s.addr, None)
        if ch is not None:
            ch.close()
        assert_healthy(s)
        print("\nfuzz statuses:", sorted(SEEN.items()))


@pytest.fixture(scope="module")
def fuzz_client(fuzz_server):
    c = fuzz_server.client()
    yield c
    c.channel.close()


def assert_healthy(server: Server) -> None:
    with server.channel() as ch:
        info = pb.GetClusterInfoResponse.FromString(ch.unary_unary(
            "/silo.v1.Silo/GetClusterInfo")(b"", timeout=CALL_TIMEOUT))
    assert info.num_shards == 4
    tracebacks = [line for line in server.log if "Traceback" in line]
    assert not tracebacks, "".join(server.log[-60:])


# ---- strategies from descriptors ------------------------------------------------------

_TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "x" * 65, "x" * 129, "y" * 5000, "z" * 40_000, "\x00", "a\x00b", "é",
                     "😀" * 40, "../../etc", "floating_refresh:k", "-", "00000000-0000-0000-0000-000000000000"]),
)
_I32 = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 99, 100]),
                 st.integers(-(2**31), 2**31 - 1))
_I64 = st.one_of(st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 2**62, 10**13, 1000]),
                 st.integers(-(2**63), 2**63 - 1))
_U32 = st.one_of(st.sampled_from([0, 1, 2, 99, 100, 2**32 - 1]), st.integers(0, 2**32 - 1))
_U64 = st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(0, 2**64 - 1))
_DOUBLE = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 2.0, 1e308, -1e308, float("nan"),
                                     float("inf"), float("-inf"), 5e-324]),
                    st.floats(allow_nan=True, allow_infinity=True))
_INTS = {
    FieldDescriptor.TYPE_INT32: _I32, FieldDescriptor.TYPE_SINT32: _I32,
    FieldDescriptor.TYPE_SFIXED32: _I32, FieldDescriptor.TYPE_INT64: _I64,
    FieldDescriptor.TYPE_SINT64: _I64, FieldDescriptor.TYPE_SFIXED64: _I64,
    FieldDescriptor.TYPE_UINT32: _U32, FieldDescriptor.TYPE_FIXED32: _U32,
    FieldDescriptor.TYPE_UINT64: _U64, FieldDescriptor.TYPE_FIXED64: _U64,
}


def _string(name: str, shards: list[str]) -> st.SearchStrategy[str]:
    real: list[str] = []
    if name in ("shard", "shard_id"):
        real = shards
    elif name in ("tenant", "tenant_id"):
        real = TENANTS
    elif name == "task_group":
        real = GROUPS
    elif name in ("id", "job_id"):
        real = JOB_IDS
    if real:
        return st.one_of(st.sampled_from(real), st.sampled_from(real), _TEXT)
    return _TEXT


def _scalar(f: FieldDescriptor, shards: list[str]) -> st.SearchStrategy:
    t = f.type
    if f.name in SHORT:
        return st.integers(0, 1)
    if t == FieldDescriptor.TYPE_STRING:
        return _string(f.name, shards)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 70_000))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_DOUBLE:
        return _DOUBLE
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), _I32)
    return _INTS[t]


def _is_repeated(f: FieldDescriptor) -> bool:
    return f.is_repeated


@st.composite
def message(draw, desc: Descriptor, shards: list[str], depth: int = 0):
    m = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if not draw(st.booleans()):
            continue
        mt = f.message_type
        if mt is not None and mt.GetOptions().map_entry:
            kf, vf = mt.fields_by_name["key"], mt.fields_by_name["value"]
            keys = draw(st.lists(_scalar(kf, shards), max_size=3, unique=True))
            target = getattr(m, f.name)
            for k in keys:
                if vf.message_type is not None:
                    if depth < 3:
                        target[k].CopyFrom(draw(message(vf.message_type, shards, depth + 1)))
                else:
                    target[k] = draw(_scalar(vf, shards))
        elif mt is not None:
            if depth >= 3:
                continue
            n = draw(st.integers(0, 3)) if _is_repeated(f) else 1
            for _ in range(n):
                sub = draw(message(mt, shards, depth + 1))
                if _is_repeated(f):
                    getattr(m, f.name).add().CopyFrom(sub)
                else:
                    getattr(m, f.name).CopyFrom(sub)
        elif _is_repeated(f):
            getattr(m, f.name).extend(draw(st.lists(_scalar(f, shards), max_size=3)))
        else:
            setattr(m, f.name, draw(_scalar(f, shards)))
    return m


# ---- calls --------------------------------------------------------------------------


_CHANNELS: dict[str, grpc.Channel] = {}


def channel(server: Server) -> grpc.Channel:
    """One channel per server for the whole module (a connection per call is slow)."""
    if server.addr not in _CHANNELS:
        _CHANNELS[server.addr] = server.channel()
    return _CHANNELS[server.addr]


def call(server: Server, method, body: bytes) -> tuple[grpc.StatusCode, str]:
    """Send one request (raw bytes); return the status it ended with."""
    path = f"/{SERVICE.full_name}/{method.name}"
    ch = channel(server)
    timeout = SLOW_BY_DESIGN.get(method.name, CALL_TIMEOUT)
    try:
        if method.server_streaming:
            for _ in ch.unary_stream(path)(body, timeout=timeout):
                pass
        else:
            ch.unary_unary(path)(body, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def check(server: Server, method, body: bytes) -> None:
    code, details = call(server, method, body)
    SEEN[(method.name, code.name)] += 1
    assert code != grpc.StatusCode.UNKNOWN, (method.name, details, body[:200])
    assert len(details) <= 1100, (method.name, code, details[:200])  # input is never echoed whole
    tracebacks = [line for line in server.log if "Traceback" in line]
    assert not tracebacks, "".join(server.log[-40:])


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_fuzz_every_request_message(fuzz_server, fuzz_client, method):
    shards = [o.shard_id for o in fuzz_client.owners]

    @_FUZZ
    @given(message(method.input_type, shards))
    def run(req):
        check(fuzz_server, method, req.SerializeToString())

    run()


@settings(_FUZZ, max_examples=100)
@given(st.sampled_from(METHODS), st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=8).map(lambda b: b"\x0a\xff\xff\xff\xff\x0f" + b),  # absurd length
    st.binary(max_size=8).map(lambda b: b"\x12\x02\xc3\x28" + b),  # invalid UTF-8 string
))
def test_fuzz_raw_bytes(fuzz_server, method, body):
    check(fuzz_server, method, body)


@st.composite
def plausible_enqueue(draw) -> pb.EnqueueRequest:
    """An Enqueue that usually passes validation (due now, small numbers, real limits),
    and in one draw of four carries edge values, so jobs reach leasing, limits, retries,
    the reaper and grants as well as the validation edges."""
    edgy = draw(st.integers(0, 3)) == 0
    big = 100 * 365 * 86_400_000

    def num(lo: int, hi: int, edges: list[int]) -> int:
        return draw(st.sampled_from(edges) if edgy else st.integers(lo, hi))

    def factor() -> float:
        return draw(_DOUBLE if edgy else st.floats(0, 4))

    u32 = [0, 1, 2**32 - 1]
    i64 = [0, -1, big, big + 1, 2**63 - 1]
    req = pb.EnqueueRequest(priority=num(0, 99, [0, 99, 100, 2**32 - 1]),
                            id=draw(st.sampled_from(JOB_IDS)) if edgy else "")
    req.payload.msgpack = draw(st.binary(max_size=32))
    if draw(st.booleans()):
        rp = req.retry_policy
        rp.retry_count = num(0, 3, u32)
        rp.initial_interval_ms = num(0, 50, i64)
        rp.max_interval_ms = num(0, 200, i64)
        rp.randomize_interval = draw(st.booleans())
        rp.backoff_factor = factor()
    for kind in draw(st.lists(st.sampled_from(["c", "f", "r"]), max_size=3)):
        lim = req.limits.add()
        key = draw(st.sampled_from(["k1", "k2"]))
        if kind == "c":
            lim.concurrency.key, lim.concurrency.max_concurrency = key, num(1, 3, u32)
        elif kind == "f":
            f = lim.floating_concurrency
            f.key, f.default_max_concurrency = key, num(1, 3, u32)
            f.refresh_interval_ms = num(0, 500, i64)
        else:
            r = lim.rate_limit
            r.name, r.unique_key = key, draw(st.sampled_from(["", "u"]))
            r.limit = num(1, 5, [0, 1, 2**53, 2**53 + 1, -1])
            r.duration_ms = num(1, 2000, i64)
            r.hits = num(0, 3, [-1, 0, 2**31 - 1])
            r.algorithm = draw(st.sampled_from([0, 1, 7]))
            if draw(st.booleans()):
                p = r.retry_policy
                p.initial_backoff_ms, p.max_backoff_ms = num(0, 50, i64), num(0, 200, i64)
                p.backoff_multiplier = factor()
                p.max_retries = num(0, 3, u32)
    return req


@settings(_FUZZ, max_examples=80)
@given(st.data())
def test_fuzz_job_lifecycle(fuzz_server, fuzz_client, data):
    """Random jobs routed to a valid (tenant, shard) pair, leased and given random
    outcomes: whatever limits and retry numbers Enqueue accepts, the state machine
    must handle (retries, rate-limit waits, grants)."""
    tenant = data.draw(st.sampled_from(TENANTS))
    shard = fuzz_client.shard_for(tenant)
    req = data.draw(st.one_of(plausible_enqueue(),
                              message(pb.EnqueueRequest.DESCRIPTOR, [shard])))
    req.shard, req.tenant = shard, tenant
    req.task_group = data.draw(st.sampled_from(GROUPS))
    # Everything random is drawn up front: what the server answers must not change
    # which draws happen (hypothesis replays examples).
    rounds = data.draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    outcomes = data.draw(st.lists(st.tuples(
        st.sampled_from(["success", "failure", "cancelled", "none"]),
        st.binary(max_size=16), _TEXT), min_size=5, max_size=5))
    new_max = data.draw(_U32)
    methods = SERVICE.methods_by_name
    check(fuzz_server, methods["Enqueue"], req.SerializeToString())
    for max_tasks in rounds:
        try:
            got = pb.LeaseTasksResponse.FromString(channel(fuzz_server).unary_unary(
                "/silo.v1.Silo/LeaseTasks")(pb.LeaseTasksRequest(
                    worker_id="fuzz", max_tasks=max_tasks,
                    task_group=req.task_group).SerializeToString(), timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:
            assert e.code() != grpc.StatusCode.UNKNOWN
            continue
        SEEN[("LeaseTasks(lifecycle)", f"{len(got.tasks)} tasks")] += 1
        for task, (kind, result, code) in zip(got.tasks, outcomes, strict=False):
            out = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id,
                                          tenant_id=task.tenant_id)
            if kind == "success":
                out.success.msgpack = result
            elif kind == "failure":
                out.failure.code = code
            elif kind == "cancelled":
                out.cancelled.SetInParent()
            else:  # no outcome: heartbeat it, then leave it to the lease reaper
                hb = pb.HeartbeatRequest(shard=task.shard, worker_id="fuzz", task_id=task.id,
                                         tenant_id=task.tenant_id)
                check(fuzz_server, methods["Heartbeat"], hb.SerializeToString())
            check(fuzz_server, methods["ReportOutcome"], out.SerializeToString())
        for task in got.refresh_tasks:
            rr = pb.ReportRefreshOutcomeRequest(shard=task.shard, task_id=task.id,
                                                tenant_id=task.tenant_id)
            rr.success.new_max_concurrency = new_max
            check(fuzz_server, methods["ReportRefreshOutcome"], rr.SerializeToString())
