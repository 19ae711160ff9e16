"""Forwarding calls between worker processes over Unix sockets.

A call that lands on a process that does not own its shard is relayed to the owner as
raw frames, not as another gRPC call (measured ~60x cheaper): a 4-byte big-endian
length, then a msgpack array. Request `[id, method, request_bytes]`; reply
`[id, code, message, trailers, response_bytes]` where `code` is the gRPC status code
number (0 = OK) and `message`/`trailers` the exact status the owner produced, so the
caller relays the owner's answer unchanged. Many calls are in flight per connection,
matched by id. The serialized request is passed through as it came off the wire once
re-encoded; the owner parses it, the caller parses only the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable

import grpc
import msgspec

from silo.errors import SiloError
from silo.observability import metrics, tracing

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 30
_CODES = {c.value[0]: c for c in grpc.StatusCode}

Reply = tuple[int, str, tuple[tuple[str, str], ...], bytes]
Dispatch = Callable[[str, bytes], Awaitable[Reply]]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(tuple[int, str, bytes])
_reply_decoder = msgspec.msgpack.Decoder(tuple[int, int, str, list[tuple[str, str]], bytes])


def _frame(obj: object) -> bytes:
    body = _encoder.encode(obj)
    return _LEN.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes is too large")
    return await reader.readexactly(n)


class PeerServer:
    """Accepts forwarded calls on this process's Unix socket and answers them."""

    def __init__(self, path: str, dispatch: Dispatch) -> None:
        self.path = path
        self._dispatch = dispatch
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                       limit=MAX_FRAME)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                body = await _read_frame(reader)
                req_id, method, payload = _request_decoder.decode(body)
                t = asyncio.create_task(self._answer(writer, req_id, method, payload))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, req_id: int, method: str,
                      payload: bytes) -> None:
        try:
            code, message, trailers, out = await self._dispatch(method, payload)
        except SiloError as e:
            code, message, trailers, out = e.code.value[0], e.message, e.trailers, b""
        except Exception as e:  # noqa: BLE001 - every call gets an answer
            log.exception("forwarded %s failed", method)
            code, message, trailers, out = grpc.StatusCode.INTERNAL.value[0], str(e), (), b""
        if not writer.is_closing():
            writer.write(_frame((req_id, code, message, trailers, out)))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()


class PeerClient:
    """One multiplexed connection to another worker's PeerServer, reconnected on demand."""

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._next_id = 0
        self._connecting: asyncio.Lock = asyncio.Lock()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            try:
                reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_FRAME)
            except OSError as e:
                raise self._unavailable(f"cannot reach it ({e.strerror or e})") from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_replies(reader, writer))
            return writer

    def _unavailable(self, why: str) -> SiloError:
        return SiloError(grpc.StatusCode.UNAVAILABLE,
                         f"shard not ready: owner process {self.name} is unavailable: {why}")

    async def _read_replies(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                body = await _read_frame(reader)
                req_id, code, message, trailers, out = _reply_decoder.decode(body)
                fut = self._pending.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((code, message, tuple(trailers), out))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            pending, self._pending = self._pending, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(self._unavailable("connection lost"))

    async def call(self, method: str, payload: bytes) -> bytes:
        """Send one call; return the reply bytes or raise the owner's status as SiloError."""
        t0 = time.perf_counter()
        try:
            if tracing.ENABLED:
                with tracing.span("forward", {"silo.peer": self.name, "rpc.method": method}):
                    return await self._call(tracing.inject_method(method), payload)
            return await self._call(method, payload)
        finally:
            metrics.FORWARDED.inc((method, self.name))
            metrics.FORWARD_DURATION.observe((method,), time.perf_counter() - t0)

    async def _call(self, method: str, payload: bytes) -> bytes:
        writer = await self._connect()
        self._next_id += 1
        req_id = self._next_id
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            writer.write(_frame((req_id, method, payload)))
            code, message, trailers, out = await fut
        finally:
            self._pending.pop(req_id, None)
        if code != 0:
            raise SiloError(_CODES.get(code, grpc.StatusCode.UNKNOWN), message, trailers)
        return out

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
