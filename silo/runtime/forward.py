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


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _SO_PEERCRED.size)
    except OSError:
        return None
    return _SO_PEERCRED.unpack(creds)[1]


class _Frames(asyncio.Protocol):
    """Length-prefixed frames cut out of the byte stream as it arrives.

    Each `data_received` hands every complete frame to `frame(body)` at once, in the
    loop's I/O callback: no reader task to wake and no `readexactly` pair per frame
    (asyncio streams cost ~30 % of a hop's instructions, bench/forward_cost.py). A body
    is a memoryview valid only during the call; `limit` bounds a frame's announced size
    (a few bytes until the handshake is done)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need = 4  # bytes _buf must hold before a frame in it is complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:  # the rest of a frame begun in an earlier read
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            self._buf = bytearray()
        n = len(data)
        pos = 0
        with memoryview(data) as view:
            while n - pos >= 4:
                (size,) = _LEN.unpack_from(data, pos)
                if size > self.limit:
                    self.bad_frame(ValueError(f"frame of {size} bytes is too large"))
                    return
                end = pos + 4 + size
                if end > n:
                    break
                self.frame(view[pos + 4:end])
                if self.transport is None or self.transport.is_closing():
                    return
                pos = end
        if pos < n:
            self._buf = bytearray(data[pos:])
            self._need = (4 + _LEN.unpack_from(data, pos)[0]) if n - pos >= 4 else 4

    def frame(self, body: memoryview) -> None:
        raise NotImplementedError

    def bad_frame(self, e: Exception) -> None:
        raise NotImplementedError


class _ServerConnection(_Frames):
    """One sibling's connection to this process's PeerServer: the handshake (client
    nonce, then its proof), then request frames, each answered by its own task."""

    def __init__(self, server: PeerServer) -> None:
        super().__init__(HANDSHAKE_FRAME)
        self._server = server
        self._client_nonce = b""
        self._server_nonce = b""
        self._ready = False
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._conns.add(self)
        if _peer_uid(transport) != os.getuid():
            self._refuse()
            return
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._refuse)

    def connection_lost(self, exc: Exception | None) -> None:
        self._refuse()  # a caller that hung up before proving itself was refused too
        self._server._conns.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self.transport = None

    def _refuse(self) -> None:
        if self._ready or self._refused or self.transport is None:
            return
        self._refused = True
        self._server.refused += 1
        log.warning("refused a connection to %s: not a worker of this server",
                    self._server.path)
        self.transport.close()

    def bad_frame(self, e: Exception) -> None:
        if not self._ready:
            self._refuse()
            return
        log.warning("dropped a peer connection: bad frame (%s)", e)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def frame(self, body: memoryview) -> None:
        if self._ready:
            try:
                req_id, method, payload, auth, deadline = _request_decoder.decode(body)
            except (ValueError, msgspec.DecodeError) as e:
                self.bad_frame(e)
                return
            server = self._server
            t = asyncio.create_task(server._answer(self, req_id, method, payload,
                                                   Forwarded(auth, deadline)))
            server._tasks.add(t)
            t.add_done_callback(server._tasks.discard)
            return
        secret = self._server._secret
        if not self._client_nonce:
            if len(body) != NONCE_BYTES:
                self._refuse()
                return
            self._client_nonce = bytes(body)
            self._server_nonce = os.urandom(NONCE_BYTES)
            self.write(_raw_frame(self._server_nonce + _mac(
                secret, b"S", self._client_nonce, self._server_nonce)))
            return
        if not hmac.compare_digest(bytes(body), _mac(secret, b"C", self._server_nonce,
                                                     self._client_nonce)):
            self._refuse()
            return
        self._ready = True
        self.limit = MAX_FRAME
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class PeerServer:
    """Accepts forwarded calls on this process's Unix socket and answers them."""

    def __init__(self, path: str, dispatch: Dispatch, secret: bytes) -> None:
        self.path = path
        self._dispatch = dispatch
        self._secret = secret
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._conns: set[_ServerConnection] = set()
        self.refused = 0  # connections that failed the uid check or the handshake

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _ServerConnection(self),
                                                     path=self.path)
        os.chmod(self.path, 0o600)

    async def _answer(self, conn: _ServerConnection, req_id: int, method: str,
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
        if not conn.is_closing():
            conn.write(_frame((req_id, code, message, trailers, out)))

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
        for c in list(self._conns):
            c.close()
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class _ClientConnection(_Frames):
    """This process's end of a connection to a sibling's PeerServer: the handshake, then
    reply frames, each completing the call waiting under its id."""

    def __init__(self, client: PeerClient) -> None:
        super().__init__(HANDSHAKE_FRAME)
        self._client = client
        self._nonce = os.urandom(NONCE_BYTES)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.write(_raw_frame(self._nonce))  # type: ignore[attr-defined]

    def frame(self, body: memoryview) -> None:
        if self.ready.done():
            try:
                req_id, code, message, trailers, out = _reply_decoder.decode(body)
            except (ValueError, msgspec.DecodeError) as e:
                self.bad_frame(e)
                return
            client = self._client
            client._silent_until = 0.0
            fut = client._pending.pop(req_id, None)
            if fut is not None and not fut.done():
                fut.set_result((code, message, tuple(trailers), out))
            return
        answer = bytes(body)
        server_nonce, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
        if not hmac.compare_digest(proof, _mac(self._client._secret, b"S", self._nonce,
                                               server_nonce)):
            self._fail_handshake(ValueError("the socket's owner is not a worker of this server"))
            return
        self.transport.write(_raw_frame(  # type: ignore[union-attr]
            _mac(self._client._secret, b"C", server_nonce, self._nonce)))
        self.limit = MAX_FRAME
        self.ready.set_result(None)

    def _fail_handshake(self, e: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(e)
        if self.transport is not None:
            self.transport.close()

    def bad_frame(self, e: Exception) -> None:
        self._fail_handshake(e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed during the handshake"))
            self.ready.exception()  # retrieved: the connecting call may have given up
        self._client._lost(self)


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
        self._conn: _ClientConnection | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._next_id = 0
        self._connecting: asyncio.Lock = asyncio.Lock()

    def _open(self) -> _ClientConnection | None:
        c = self._conn
        return c if c is not None and c.transport is not None \
            and not c.transport.is_closing() else None

    async def _connect(self) -> _ClientConnection:
        async with self._connecting:
            c = self._open()
            if c is not None:
                return c
            loop = asyncio.get_running_loop()
            try:
                _, c = await loop.create_unix_connection(lambda: _ClientConnection(self),
                                                         self.path)
            except OSError as e:
                raise self._unavailable(f"cannot reach it ({e.strerror or e})") from None
            try:
                await c.ready
            except (ValueError, ConnectionError) as e:
                if c.transport is not None:
                    c.transport.close()
                raise self._unavailable(f"handshake failed ({e})") from None
            self._conn = c
            return c

    def _lost(self, c: _ClientConnection) -> None:
        """The connection closed: every call waiting on it fails UNAVAILABLE."""
        if self._conn is not c:
            return
        self._conn = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._unavailable("connection lost"))

    @property
    def silent(self) -> bool:
        """A recent call timed out and nothing was heard from the owner since; optional
        calls (LeaseTasks) skip it for SILENT_SKIP_S, then try it again."""
        return self._silent_until > 0 and time.monotonic() < self._silent_until

    def _unavailable(self, why: str) -> SiloError:
        return SiloError(grpc.StatusCode.UNAVAILABLE,
                         f"shard not ready: owner process {self.name} is unavailable: {why}")

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
            conn = self._open()
            if conn is None:
                connecting = asyncio.ensure_future(self._connect())
                await asyncio.wait((connecting, fut), return_when=asyncio.FIRST_COMPLETED)
                if fut.done():  # timed out while connecting
                    connecting.cancel()
                    return self._result(fut.result())
                conn = connecting.result()
            self._next_id += 1
            req_id = self._next_id
            self._pending[req_id] = fut
            try:
                conn.transport.write(  # type: ignore[union-attr]
                    _frame((req_id, method, payload, auth, deadline)))
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
        c = self._conn
        if c is not None and c.transport is not None:
            c.transport.close()
            await asyncio.sleep(0)  # its connection_lost runs: waiting calls fail at once
