"""Client-side routing, error mapping and payload codecs (no server)."""

from __future__ import annotations

import grpc
import msgspec
import pytest

from silo._proto import silo_pb2 as pb
from silo.client import errors
from silo.client.routing import ShardInfo, Topology, hash_key, hash_tenant
from silo.client.types import (
    Cancelled,
    ConcurrencyLimit,
    Failure,
    FloatingConcurrencyLimit,
    JobResult,
    JobStatus,
    RateLimit,
    RateLimitRetryPolicy,
    RetryPolicy,
    Task,
    decode_strict,
    decode_tolerant,
    limit_from_pb,
    outcome_to_pb,
)


@pytest.mark.parametrize("tenant,expected", [
    ("-", "7a162ebe4ce6fc55"),
    ("test-tenant", "7bda10a719882c53"),
    ("tenant-a", "24cbcbec76c2694a"),
    ("ünï", "0de04b65318f8bc9"),
])
def test_reference_hashes(tenant, expected):
    assert hash_tenant(tenant) == expected


def test_empty_and_missing_tenant_hash_as_default():
    assert hash_tenant(None) == hash_tenant("") == hash_tenant("-") == "7a162ebe4ce6fc55"
    assert hash_key("") == "ef46db3751d8e999"  # the raw hash of "" (never used for routing)


def even_topology(n: int, addr: str = "a:1") -> Topology:
    bounds = [format((i << 64) // n, "016x") for i in range(1, n)]
    starts, ends = [""] + bounds, bounds + [""]
    shards = [ShardInfo(f"s{i}", addr, s, e) for i, (s, e) in enumerate(zip(starts, ends,
                                                                           strict=True))]
    return Topology(reversed(shards))  # order must not matter


def test_eight_shard_boundaries():
    t = even_topology(8)
    assert [s.range_start for s in t.shards] == [
        "", "2000000000000000", "4000000000000000", "6000000000000000", "8000000000000000",
        "a000000000000000", "c000000000000000", "e000000000000000"]
    assert t.shard_for_key("0000000000000000").shard_id == "s0"
    assert t.shard_for_key("1fffffffffffffff").shard_id == "s0"
    assert t.shard_for_key("2000000000000000").shard_id == "s1"  # start inclusive
    assert t.shard_for_key("dfffffffffffffff").shard_id == "s6"
    assert t.shard_for_key("ffffffffffffffff").shard_id == "s7"
    assert t.shard_for_tenant("-").shard_id == "s3"  # 7a16… in [6000…, 8000…)
    assert t.shard_for_tenant(None).shard_id == "s3"


def test_every_key_lands_in_exactly_its_range():
    t = even_topology(5)
    for i in range(2000):
        key = hash_tenant(f"tenant-{i}")
        s = t.shard_for_key(key)
        assert (s.range_start == "" or key >= s.range_start)
        assert (s.range_end == "" or key < s.range_end)


def test_single_shard_and_gaps():
    one = Topology([ShardInfo("only", "a:1", "", "")])
    assert one.shard_for_tenant("anything").shard_id == "only"
    gap = Topology([ShardInfo("lo", "a:1", "", "4000000000000000"),
                    ShardInfo("hi", "a:1", "8000000000000000", "")])
    assert gap.shard_for_key("3fffffffffffffff").shard_id == "lo"
    assert gap.shard_for_key("8000000000000000").shard_id == "hi"
    with pytest.raises(errors.TopologyError, match="No shard found for tenant"):
        gap.shard_for_key("5000000000000000")
    with pytest.raises(errors.TopologyError, match="Cluster topology not discovered yet"):
        Topology([]).shard_for_key("00")


def test_topology_from_cluster_info_drops_unowned_and_maps_addresses():
    info = pb.GetClusterInfoResponse(num_shards=3, shard_owners=[
        pb.ShardOwner(shard_id="b", grpc_addr="n2:7450", range_start="8000000000000000",
                      range_end=""),
        pb.ShardOwner(shard_id="a", grpc_addr="n1:7450", range_start="",
                      range_end="8000000000000000"),
        pb.ShardOwner(shard_id="c", grpc_addr="", range_start="x", range_end="y"),
    ])
    t = Topology.from_cluster_info(info, lambda a: a.replace("n", "10.0.0."))
    assert [s.shard_id for s in t.shards] == ["a", "b"]
    assert t.addresses == ["10.0.0.1:7450", "10.0.0.2:7450"]
    t.set_owner("b", "other:1")
    assert t.shard_for_key("9000000000000000").grpc_addr == "other:1"


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailers=()):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


C = grpc.StatusCode


def test_error_mapping():
    e = errors.from_rpc_error(FakeRpcError(C.NOT_FOUND, "job not found"), op="job",
                              job_id="j1", tenant="t")
    assert isinstance(e, errors.JobNotFound) and e.code == C.NOT_FOUND
    assert e.message == "Job j1 not found (tenant t)" and e.server_message == "job not found"
    e = errors.from_rpc_error(FakeRpcError(C.NOT_FOUND, "shard not found",
                                           (("x-silo-shard-owner-addr", "h:1"),)), op="job")
    assert type(e) is errors.NotFound and e.trailers == {"x-silo-shard-owner-addr": "h:1"}
    e = errors.from_rpc_error(FakeRpcError(C.ALREADY_EXISTS, "dup"), op="enqueue", job_id="x")
    assert isinstance(e, errors.JobAlreadyExists) and e.job_id == "x" and e.message == "dup"
    for code, msg in ((C.NOT_FOUND, "lease not found"),
                      (C.FAILED_PRECONDITION, "lease owner mismatch")):
        e = errors.from_rpc_error(FakeRpcError(code, msg), op="lease")
        assert isinstance(e, errors.LeaseLost) and e.code == code
    e = errors.from_rpc_error(FakeRpcError(C.FAILED_PRECONDITION, "tenant 'x' is not within"),
                              op="lease")
    assert type(e) is errors.FailedPrecondition
    for code, cls in ((C.INVALID_ARGUMENT, errors.InvalidArgument),
                      (C.PERMISSION_DENIED, errors.PermissionDenied),
                      (C.UNAUTHENTICATED, errors.Unauthenticated),
                      (C.UNAVAILABLE, errors.Unavailable),
                      (C.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
                      (C.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
                      (C.UNIMPLEMENTED, errors.Unimplemented),
                      (C.INTERNAL, errors.Internal),
                      (C.DATA_LOSS, errors.SiloError)):
        e = errors.from_rpc_error(FakeRpcError(code, "m"))
        assert type(e) is cls and e.code == code and str(e) == "m"


def test_retry_classification():
    assert errors.is_wrong_shard(C.NOT_FOUND, "shard not found")
    assert not errors.is_wrong_shard(C.NOT_FOUND, "job not found")
    assert not errors.is_wrong_shard(C.FAILED_PRECONDITION, "shard not found")
    assert errors.is_connectivity(C.UNAVAILABLE, "")
    assert errors.is_connectivity(C.DEADLINE_EXCEEDED, "")
    assert errors.is_connectivity(C.INTERNAL, "Received RST_STREAM with code 2")
    assert not errors.is_connectivity(C.INTERNAL, "boom")
    assert not errors.is_connectivity(C.RESOURCE_EXHAUSTED, "")


def test_codecs():
    assert decode_strict(msgspec.msgpack.encode({"a": 1})) == {"a": 1}
    with pytest.raises(ValueError, match="No bytes to decode"):
        decode_strict(b"")
    assert decode_tolerant(b"") is None and decode_tolerant(None) is None
    assert decode_tolerant(b"\xc1oops") == "\ufffdoops"  # 0xc1 is never valid msgpack
    t = Task(pb.Task(id="t", job_id="j", payload=pb.SerializedBytes(msgpack=b"")))
    assert t.tenant_id is None
    with pytest.raises(ValueError):
        _ = t.payload


def test_outcomes_to_pb():
    r = pb.ReportOutcomeRequest()
    outcome_to_pb(r, {"x": 1})
    assert msgspec.msgpack.decode(r.success.msgpack) == {"x": 1}
    r = pb.ReportOutcomeRequest()
    outcome_to_pb(r, Failure("E", b"\x01\x02"))
    assert r.failure.code == "E" and r.failure.data.msgpack == b"\x01\x02"  # bytes as-is
    r = pb.ReportOutcomeRequest()
    outcome_to_pb(r, Failure("E", {"a": 1}))
    assert msgspec.msgpack.decode(r.failure.data.msgpack) == {"a": 1}
    r = pb.ReportOutcomeRequest()
    outcome_to_pb(r, Cancelled())
    assert r.WhichOneof("outcome") == "cancelled"


def test_limits_and_policies_round_trip():
    lims = [ConcurrencyLimit("k", 3),
            RateLimit("r", "u", 10, 1000, retry_policy=RateLimitRetryPolicy(5, 50, 1.5, 2)),
            FloatingConcurrencyLimit("f", 2, 100, {"m": "1"})]
    assert [limit_from_pb(x.to_pb()) for x in lims] == lims
    rp = RetryPolicy(3, 10, 100, True, 1.5)
    assert RetryPolicy.from_pb(rp.to_pb()) == rp


def test_job_result_from_pb():
    m = pb.GetJobResultResponse(id="j", status=pb.JOB_STATUS_FAILED,
                                failure=pb.JobFailure(error_code="E", error_data=pb.SerializedBytes(
                                    msgpack=msgspec.msgpack.encode("why"))))
    r = JobResult.from_pb(m)
    assert r.failed and r.error_code == "E" and r.error_data == "why"
    assert JobStatus.SUCCEEDED.terminal and not JobStatus.RUNNING.terminal
