"""Undecodable bodies and echoed input (issue 14 item 7): a clear status, auth first,
bounded messages, no traceback or log flood."""

from __future__ import annotations

import time

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server

GARBAGE = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x12\x03\xc3\x28\x00", b"\x08" + b"\xff" * 11]


def raw_call(server: Server, method: str, body: bytes, metadata=(), timeout: float = 10):
    with server.channel() as ch:
        call = ch.unary_unary(f"/silo.v1.Silo/{method}", request_serializer=None,
                              response_deserializer=None)
        return call(body, metadata=metadata, timeout=timeout)


def wait_log(server: Server, needle: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in line for line in server.log):
            return True
        time.sleep(0.05)
    return False


def test_undecodable_bodies_are_invalid_argument_with_one_log_line(server):
    for method in ("Enqueue", "GetJob", "LeaseTasks", "ReportOutcome", "Query", "QueryArrow"):
        for body in GARBAGE:
            with pytest.raises(grpc.RpcError) as e:
                r = raw_call(server, method, body)
                if method == "QueryArrow":
                    list(r)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, body)
            assert "request body is not a valid silo.v1." in e.value.details()
    # Still serving, and the flood left at most one line and no traceback.
    pb.GetClusterInfoResponse.FromString(raw_call(server, "GetClusterInfo", b""))
    assert wait_log(server, "undecodable")
    assert sum("undecodable" in line for line in server.log) <= 2  # one per process at most
    assert not any("Traceback" in line for line in server.log)


def test_auth_is_checked_before_the_body_is_parsed(tmp_path):
    with Server(tmp_path, "--auth-token", "s3cret", "--shards", "2") as s:
        with pytest.raises(grpc.RpcError) as e:
            raw_call(s, "Enqueue", b"\xff\xff\xff")
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            raw_call(s, "Enqueue", b"\xff\xff", metadata=(("authorization", "Bearer nope"),))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for name in ("Query", "ImportJobs", "RequestSplit"):  # unimplemented ones too
            with pytest.raises(grpc.RpcError) as e:
                raw_call(s, name, b"")
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            raw_call(s, "Enqueue", b"\xff\xff", metadata=(("authorization", "Bearer s3cret"),))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_huge_shard_id_is_not_echoed(client):
    big = "x" * (1 << 20)
    for rpc, req in [("GetJob", pb.GetJobRequest(shard=big, id="j")),
                     ("Enqueue", pb.EnqueueRequest(shard=big, task_group="g")),
                     ("ForceReleaseShard", pb.ForceReleaseShardRequest(shard=big))]:
        with pytest.raises(grpc.RpcError) as e:
            getattr(client.stub, rpc)(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
        assert e.value.details().startswith("invalid shard ID: xxx")
        assert len(e.value.details()) < 200


def test_sql_errors_do_not_echo_a_huge_statement(client):
    """The engine quotes the statement in its parse error; Query and QueryArrow (a
    streaming handler outside the rpc wrapper) both cut it to the message bound."""
    shard = client.shard_for(None)
    sql = "y" * 5000
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Query(pb.QueryRequest(shard=shard, sql=sql), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(e.value.details()) <= 1100
    with pytest.raises(grpc.RpcError) as e:
        list(client.stub.QueryArrow(pb.QueryArrowRequest(shard=shard, sql=sql), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("SQL error") and len(e.value.details()) <= 1100
