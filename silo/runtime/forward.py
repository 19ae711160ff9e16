"""Forwarding calls between worker processes over Unix sockets.

A call that lands on a process that does not own its shard is relayed to the owner as
raw frames, not as another gRPC call (measured ~60x cheaper): a 4-byte big-endian
length, then a msgpack array. Request `[id, method, request_bytes, authorization,
deadline]`; reply `[id, code, message, trailers, response_bytes]` where `code` is the
gRPC status code number (0 = OK) and `message`/`trailers` the exact status the owner
produced, so the caller relays the owner's answer unchanged. Many calls are in flight
per connection, matched by id.

Only sibling workers of the same server may use a socket (issue 14): the supervisor
makes a random secret before forking (inherited in memory, never on disk or in the
environment), and every connection starts with a mutual challenge-response over it
(HMAC-SHA256 of both sides' nonces), after the peer's uid was checked with SO_PEERCRED.
Until the handshake succeeds frames are limited to a few bytes and a few seconds.

The caller's `authorization` header and its deadline (CLOCK_MONOTONIC, shared by every
process of the machine; 0 = none) travel with each call, so the owner applies the same
rules as to a direct call and drops a call whose deadline passed before it got to it.
The caller waits at most `timeout` (option `forward_timeout_ms`) for the owner: a
stopped or wedged owner then costs UNAVAILABLE, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import logging
import os
import socket
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
HANDSHAKE_FRAME = 64
HANDSHAKE_TIMEOUT_S = 5.0
NONCE_BYTES = 16
SILENT_SKIP_S = 2.0
_CODES = {c.value[0]: c for c in grpc.StatusCode}

Reply = tuple[int, str, tuple[tuple[str, str], ...], bytes]

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(tuple[int, str, bytes, str, float])
_reply_decoder = msgspec.msgpack.Decoder(tuple[int, int, str, list[tuple[str, str]], bytes])
_SO_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class Forwarded:
    """What the owner knows of a forwarded call's caller: enough to check it like a
    direct call (`invocation_metadata()` as a gRPC context offers it)."""

    __slots__ = ("authorization", "deadline")

    def __init__(self, authorization: str, deadline: float) -> None:
        self.authorization = authorization
        self.deadline = deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", self.authorization),) if self.authorization else ()

    def time_remaining(self) -> float | None:
        return None if not self.deadline else max(0.0, self.deadline - time.monotonic())


Dispatch = Callable[[str, bytes, Forwarded], Awaitable[Reply]]

# The public call being served in this task: its authorization header and deadline go
# with every call it forwards (set by the rpc wrapper through `enter_call`). It holds the
# call's context itself and is read only when the call forwards (`_caller`): scanning
# the metadata and asking grpc for the time left cost every call ~12 us, and most calls
# never forward.
_CALL: contextvars.ContextVar = contextvars.ContextVar("silo_call", default=None)


_stopping = False


def stop_admitting() -> None:
    """This process is draining: new public calls get UNAVAILABLE (which clients retry
    elsewhere or later) instead of racing the server's shutdown (CANCELLED)."""
    global _stopping
    _stopping = True


def enter_call(context: grpc.aio.ServicerContext | None) -> None:
    """Admit a public call (refused while draining) and remember its auth header and
    deadline for the calls it forwards."""
    if _stopping:
        raise SiloError(grpc.StatusCode.UNAVAILABLE, "server is shutting down; retry")
    if context is not None:
        _CALL.set(context)


def _caller(context) -> tuple[str, float]:
    """(authorization header, deadline on CLOCK_MONOTONIC or 0.0) of the public call
    being served, as forwarded calls carry them."""
    if context is None:
        return "", 0.0
    if isinstance(context, Forwarded):
        return context.authorization, context.deadline
    auth = ""
    for k, v in context.invocation_metadata() or ():
        if k == "authorization" and isinstance(v, str):
            auth = v
            break
    remaining = context.time_remaining()  # the same absolute deadline whenever asked
    return auth, time.monotonic() + remaining if remaining is not None else 0.0


def new_secret() -> bytes:
    return os.urandom(32)


def _mac(secret: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(secret, role + a + b, hashlib.sha256).digest()


def _frame(obj: object) -> bytes:
    body = _encoder.encode(obj)
    return _LEN.pack(len(body)) + body


def _raw_frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


async def _read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if n > limit:
        raise ValueError(f"frame of {n} bytes is too large")
    return await reader.readexactly(n)


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    except OSError:
        return None
    return _SO_PEERCRED.unpack(creds)[1]


class PeerServer:
    """Accepts forwarded calls on this process's Unix socket and answers them."""

    def __init__(self, path: str, dispatch: Dispatch, secret: bytes) -> None:
        self.path = path
        self._dispatch = dispatch
        self._secret = secret
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[asyncio.StreamWriter] = set()
        self.refused = 0  # connections that failed the uid check or the handshake

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                       limit=MAX_FRAME)
        os.chmod(self.path, 0o600)

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> bool:
        if _peer_uid(writer) != os.getuid():
            return False
        client_nonce = await _read_frame(reader, HANDSHAKE_FRAME)
        if len(client_nonce) != NONCE_BYTES:
            return False
        server_nonce = os.urandom(NONCE_BYTES)
        writer.write(_raw_frame(server_nonce
                                + _mac(self._secret, b"S", client_nonce, server_nonce)))
        proof = await _read_frame(reader, HANDSHAKE_FRAME)
        return hmac.compare_digest(proof, _mac(self._secret, b"C", server_nonce, client_nonce))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            try:
                ok = await asyncio.wait_for(self._handshake(reader, writer),
                                            HANDSHAKE_TIMEOUT_S)
            except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
                ok = False
            if not ok:
                self.refused += 1
                log.warning("refused a connection to %s: not a worker of this server",
                            self.path)
                return
            while True:
                body = await _read_frame(reader)
                req_id, method, payload, auth, deadline = _request_decoder.decode(body)
                t = asyncio.create_task(self._answer(writer, req_id, method, payload,
                                                     Forwarded(auth, deadline)))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (ValueError, msgspec.DecodeError) as e:
            log.warning("dropped a peer connection: bad frame (%s)", e)
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, req_id: int, method: str,
                      payload: bytes, meta: Forwarded) -> None:
        try:
            if meta.deadline and time.monotonic() >= meta.deadline:
                # The caller gave up already (e.g. this process was stopped): applying
                # the call now would change state nobody was told about.
                raise SiloError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                "deadline passed before the owner process applied the call")
            code, message, trailers, out = await self._dispatch(method, payload, meta)
        except SiloError as e:
            code, message, trailers, out = e.code.value[0], e.message, e.trailers, b""
        except Exception as e:  # noqa: BLE001 - every call gets an answer
            log.exception("forwarded %s failed", method)
            code, message, trailers, out = grpc.StatusCode.INTERNAL.value[0], str(e), (), b""
        if not writer.is_closing():
            writer.write(_frame((req_id, code, message, trailers, out)))

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop accepting connections; give calls in flight up to `grace_s` to finish."""
        if self._server is not None:
            self._server.close()
        if grace_s > 0 and self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s)
        for t in list(self._tasks):
            t.cancel()
        for w in list(self._conns):  # their handlers see EOF and end without a traceback
            w.close()
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class PeerClient:
    """One multiplexed connection to another worker's PeerServer, reconnected on demand."""

    def __init__(self, path: str, name: str, secret: bytes = b"",
                 timeout_s: float = 5.0,
                 unresponsive: Callable[[], bool] | None = None) -> None:
        self.path = path
        self.name = name
        self.timeout_s = timeout_s
        self._unresponsive = unresponsive  # the supervisor saw it miss liveness pings
        self._silent_until = 0.0  # after a call timed out: skip it (LeaseTasks) a while
        self._secret = secret
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
            try:
                await self._handshake(reader, writer)
            except (ValueError, asyncio.IncompleteReadError, ConnectionError) as e:
                writer.close()
                raise self._unavailable(f"handshake failed ({e})") from None
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read_replies(reader, writer))
            return writer

    async def _handshake(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        client_nonce = os.urandom(NONCE_BYTES)
        writer.write(_raw_frame(client_nonce))
        answer = await _read_frame(reader, HANDSHAKE_FRAME)
        server_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if not hmac.compare_digest(proof, _mac(self._secret, b"S", client_nonce,
                                               server_nonce)):
            raise ValueError("the socket's owner is not a worker of this server")
        writer.write(_raw_frame(_mac(self._secret, b"C", server_nonce, client_nonce)))

    @property
    def silent(self) -> bool:
        """A recent call timed out and nothing was heard from the owner since; optional
        calls (LeaseTasks) skip it for SILENT_SKIP_S, then try it again."""
        return self._silent_until > 0 and time.monotonic() < self._silent_until

    def _unavailable(self, why: str) -> SiloError:
        return SiloError(grpc.StatusCode.UNAVAILABLE,
                         f"shard not ready: owner process {self.name} is unavailable: {why}")

    async def _read_replies(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                body = await _read_frame(reader)
                req_id, code, message, trailers, out = _reply_decoder.decode(body)
                self._silent_until = 0.0
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

    async def call(self, method: str, payload: bytes, timeout_s: float | None = None) -> bytes:
        """Send one call; return the reply bytes or raise the owner's status as SiloError.

        Waits at most `timeout_s` (default: this client's `timeout_s`) and never past the
        public call's deadline; the owner is told the earlier of the two."""
        t0 = time.perf_counter()
        try:
            if tracing.ENABLED:
                with tracing.span("forward", {"silo.peer": self.name, "rpc.method": method}):
                    return await self._call(tracing.inject_method(method), payload, timeout_s)
            return await self._call(method, payload, timeout_s)
        finally:
            metrics.FORWARDED.inc((method, self.name))
            metrics.FORWARD_DURATION.observe((method,), time.perf_counter() - t0)

    async def _call(self, method: str, payload: bytes, timeout_s: float | None) -> bytes:
        if self._unresponsive is not None and self._unresponsive():
            raise self._unavailable("it stopped answering liveness pings")
        auth, client_deadline = _caller(_CALL.get())
        limit = self.timeout_s if timeout_s is None else timeout_s
        now = time.monotonic()
        deadline = now + limit
        by_client = bool(client_deadline) and client_deadline <= deadline
        if by_client:
            deadline = client_deadline
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Reply] = loop.create_future()
        timer = loop.call_later(max(0.0, deadline - now), self._expire, fut, by_client, limit)
        try:
            writer = self._writer
            if writer is None or writer.is_closing():
                connecting = asyncio.ensure_future(self._connect())
                await asyncio.wait((connecting, fut), return_when=asyncio.FIRST_COMPLETED)
                if fut.done():  # timed out while connecting
                    connecting.cancel()
                    return self._result(fut.result())
                writer = connecting.result()
            self._next_id += 1
            req_id = self._next_id
            self._pending[req_id] = fut
            try:
                writer.write(_frame((req_id, method, payload, auth, deadline)))
                reply = await fut
            finally:
                self._pending.pop(req_id, None)
        finally:
            timer.cancel()
        return self._result(reply)

    def _expire(self, fut: asyncio.Future[Reply], by_client: bool, limit: float) -> None:
        if fut.done():
            return
        if by_client:
            fut.set_exception(SiloError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline exceeded waiting for owner process {self.name}"))
        else:
            self._silent_until = time.monotonic() + SILENT_SKIP_S
            fut.set_exception(self._unavailable(f"no answer within {limit * 1000:.0f} ms"))

    @staticmethod
    def _result(reply: Reply) -> bytes:
        code, message, trailers, out = reply
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
