"""The forwarding layer between worker processes: only siblings get in (secret
handshake), the owner applies every rule itself, and a silent owner costs a bounded wait."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import tempfile
import time

import grpc
import msgspec
import pytest

from silo._proto import silo_pb2 as pb
from silo.cluster.shardmap import ShardMap
from silo.errors import SiloError
from silo.rpc.service import SiloService
from silo.runtime import forward
from silo.runtime.forward import PeerClient, PeerServer, new_secret
from silo.runtime.node import Node
from silo.shard.state import ShardConfig


class FakeContext:
    """What enter_call reads from a grpc.aio context."""

    def __init__(self, token: str = "", remaining: float | None = None) -> None:
        self.token = token
        self.remaining = remaining

    def invocation_metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def time_remaining(self):
        return self.remaining


async def owner_node(**kw) -> tuple[Node, SiloService]:
    node = Node(ShardMap.create(2), "memory:///", ShardConfig(commit_interval_ms=0),
                tenancy=kw.pop("tenancy", True), dev_mode=kw.pop("dev_mode", False),
                advertised_addr="127.0.0.1:1", reaper_interval_ms=60_000)
    await node.open()
    return node, SiloService(node, auth_token=kw.pop("auth_token", ""))


def sock_path() -> str:
    return os.path.join(tempfile.mkdtemp(prefix="silo-t-"), "w.sock")


def run(coro):
    return asyncio.run(coro)


def test_owner_refuses_reset_shards_from_a_peer_when_dev_mode_is_off():
    async def main():
        node, service = await owner_node()
        secret = new_secret()
        server = PeerServer(sock_path(), service.dispatch, secret)
        await server.start()
        client = PeerClient(server.path, "w0", secret)
        sid = next(iter(node.shards))
        tenant = tenant_in(node, sid)
        job = await service.Enqueue.inner(service, pb.EnqueueRequest(
            shard=sid, tenant=tenant, task_group="g"), None)
        with pytest.raises(SiloError) as e:
            await client.call("ResetShards@local", b"")
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        got = await service.GetJob.inner(service, pb.GetJobRequest(
            shard=sid, id=job.id, tenant=tenant), None)
        assert got.id == job.id
        await client.close()
        await server.close()
        await node.close()

    run(main())


def tenant_in(node: Node, sid: str) -> str:
    i = 0
    while node.shard_map.shard_for_tenant(f"t{i}").shard_id != sid:
        i += 1
    return f"t{i}"


def test_owner_checks_the_callers_token_and_tenancy_itself():
    async def main():
        node, service = await owner_node(auth_token="tok")
        secret = new_secret()
        server = PeerServer(sock_path(), service.dispatch, secret)
        await server.start()
        client = PeerClient(server.path, "w0", secret)
        sid = next(iter(node.shards))
        req = pb.GetJobRequest(shard=sid, id="x", tenant="not-here").SerializeToString()
        with pytest.raises(SiloError) as e:  # no token at all
            await client.call("GetJob", req)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED

        async def as_caller(token: str, method: str, payload: bytes):
            forward.enter_call(FakeContext(token))
            return await client.call(method, payload)

        with pytest.raises(SiloError) as e:
            await asyncio.create_task(as_caller("wrong", "GetJob", req))
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        got = await asyncio.create_task(as_caller("tok", "LeaseTasks@local", b""))
        assert pb.LeaseTasksResponse.FromString(got).tasks == []
        other = tenant_in(node, [s for s in node.owned if s != sid][0])
        wrong_shard = pb.GetJobRequest(shard=sid, id="x", tenant=other).SerializeToString()
        with pytest.raises(SiloError) as e:  # right token: now tenancy applies
            await asyncio.create_task(as_caller("tok", "GetJob", wrong_shard))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        await client.close()
        await server.close()
        await node.close()

    run(main())


def test_a_client_without_the_secret_is_refused_and_dispatches_nothing():
    calls: list[str] = []

    async def dispatch(method, payload, meta):
        calls.append(method)
        return 0, "", (), b""

    async def main():
        server = PeerServer(sock_path(), dispatch, new_secret())
        await server.start()
        assert os.stat(server.path).st_mode & 0o077 == 0
        # 1. the old protocol: a request frame straight away
        body = msgspec.msgpack.encode((1, "ResetShards@local", b"", "", 0.0))
        reader, writer = await asyncio.open_unix_connection(server.path)
        writer.write(struct.pack(">I", len(body)) + body)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, no reply
        writer.close()
        # 2. the handshake with a wrong secret
        client = PeerClient(server.path, "w0", new_secret())
        with pytest.raises(SiloError) as e:
            await client.call("ResetShards@local", b"")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 10
        while server.refused < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert server.refused == 2 and calls == []
        await server.close()

    run(main())


def test_handshake_of_a_silent_client_times_out():
    async def main():
        server = PeerServer(sock_path(), None, new_secret())  # type: ignore[arg-type]
        await server.start()
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.path)
        old, forward.HANDSHAKE_TIMEOUT_S = forward.HANDSHAKE_TIMEOUT_S, 0.2
        try:
            deadline = time.monotonic() + 10
            while server.refused < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        finally:
            forward.HANDSHAKE_TIMEOUT_S = old
        assert server.refused == 1
        s.close()
        await server.close()

    run(main())


def test_a_silent_owner_costs_unavailable_after_the_timeout_and_late_calls_are_dropped():
    applied: list[str] = []
    release = asyncio.Event

    async def main():
        gate = release()

        async def dispatch(method, payload, meta):
            await gate.wait()
            applied.append(method)
            return 0, "", (), b"ok"

        secret = new_secret()
        server = PeerServer(sock_path(), dispatch, secret)
        await server.start()
        client = PeerClient(server.path, "w0", secret, timeout_s=0.2)
        t0 = time.monotonic()
        with pytest.raises(SiloError) as e:
            await client.call("Enqueue", b"")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no answer within 200 ms" in e.value.message
        assert time.monotonic() - t0 < 5

        async def with_deadline():
            forward.enter_call(FakeContext(remaining=0.1))
            return await client.call("Enqueue", b"", timeout_s=10)

        with pytest.raises(SiloError) as e:
            await asyncio.create_task(with_deadline())
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        gate.set()
        assert await client.call("Enqueue", b"") == b"ok"
        await client.close()
        await server.close()
        assert len(applied) == 3  # the dispatch ran (it was already past the check)

    run(main())


def test_owner_drops_a_call_whose_deadline_passed_before_it_read_it():
    applied: list[str] = []

    async def dispatch(method, payload, meta):
        applied.append(method)
        return 0, "", (), b""

    async def main():
        secret = new_secret()
        server = PeerServer(sock_path(), dispatch, secret)
        await server.start()
        client = PeerClient(server.path, "w0", secret)
        await client.call("warm-up", b"")

        async def stalled_owner():
            forward.enter_call(FakeContext(remaining=0.05))
            call = asyncio.ensure_future(client.call("Enqueue", b""))
            await asyncio.sleep(0)  # the frame is written...
            time.sleep(0.2)  # ...but the owner (this loop) is stopped past its deadline
            return await call

        with pytest.raises(SiloError) as e:
            await asyncio.create_task(stalled_owner())
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.05)
        assert applied == ["warm-up"]
        await client.close()
        await server.close()

    run(main())
