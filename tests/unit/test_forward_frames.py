"""The forwarding transport's framing (silo.runtime.forward._Frames) and the relay of an
owner's reply bytes through grpcio without a re-encode (silo.rpc.server.reply_serializer)."""

from __future__ import annotations

import asyncio
import os
import random
import struct
import tempfile

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from silo._proto import silo_pb2 as pb
from silo.rpc.server import reply_serializer
from silo.runtime import forward
from silo.runtime.forward import PeerClient, PeerServer, new_secret


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Collect(forward._Frames):
    def __init__(self, limit: int = forward.MAX_FRAME) -> None:
        super().__init__(limit)
        self.bodies: list[bytes] = []
        self.bad: list[Exception] = []
        self.connection_made(_Transport())  # type: ignore[arg-type]

    def frame(self, body: memoryview) -> None:
        self.bodies.append(bytes(body))

    def bad_frame(self, e: Exception) -> None:
        self.bad.append(e)
        self.transport.close()  # type: ignore[union-attr]


def _stream(bodies: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(b)) + b for b in bodies)


@settings(max_examples=200, deadline=None)
@given(bodies=st.lists(st.binary(max_size=300), max_size=12), seed=st.integers(0, 2**32))
def test_frames_come_out_whole_and_in_order_however_the_bytes_are_cut(bodies, seed):
    data = _stream(bodies)
    rnd = random.Random(seed)
    p = _Collect()
    pos = 0
    while pos < len(data):  # reads of 1 byte up to several frames at once
        n = rnd.choice((1, 2, 3, 5, 64, 1000))
        p.data_received(data[pos:pos + n])
        pos += n
    assert p.bodies == bodies and p.bad == []


def test_a_frame_over_the_limit_is_refused_before_its_body_arrives():
    p = _Collect(limit=64)
    p.data_received(_stream([b"ok"]) + struct.pack(">I", 65))
    assert p.bodies == [b"ok"]
    assert len(p.bad) == 1 and "65 bytes" in str(p.bad[0])


def test_a_large_frame_in_many_reads():
    body = os.urandom(3 << 20)
    data = _stream([body, b"next"])
    p = _Collect()
    for i in range(0, len(data), 65536):
        p.data_received(data[i:i + 65536])
    assert p.bodies == [body, b"next"]


def test_calls_over_the_socket_match_their_replies_by_id():
    """Many calls in flight on one connection, answered out of order."""

    async def dispatch(method, payload, meta):
        await asyncio.sleep(random.random() / 100)
        return 0, "", (), payload + method.encode()

    async def main():
        secret = new_secret()
        path = os.path.join(tempfile.mkdtemp(prefix="silo-t-"), "w.sock")
        server = PeerServer(path, dispatch, secret)
        await server.start()
        client = PeerClient(path, "w0", secret)
        got = await asyncio.gather(*(client.call(f"m{i}", msgspec.msgpack.encode(i))
                                     for i in range(200)))
        assert got == [msgspec.msgpack.encode(i) + f"m{i}".encode() for i in range(200)]
        await client.close()
        await server.close()

    asyncio.run(main())


def test_reply_serializer_relays_bytes_and_encodes_messages():
    ser = reply_serializer(pb.EnqueueResponse)
    encoded = pb.EnqueueResponse(id="j1").SerializeToString()
    assert ser(pb.EnqueueResponse(id="j1")) == encoded
    relayed = bytes(encoded)  # an owner's reply: passed on as it is, not parsed
    assert ser(relayed) is relayed
