"""The connection half of the asyncio client: channels, topology discovery, tenant
routing and retries. :class:`silo.client.SiloClient` builds its operations on it.

Routing follows Silo's TypeScript client (see the package docs): the first routed call
loads the topology from GetClusterInfo (concurrent callers share that load), each tenant
goes to the shard whose hash range holds XXH64(tenant), and a call is retried up to
``max_retries`` times when the server answers NOT_FOUND "shard not found" (the shard is
re-pointed to the ``x-silo-shard-owner-addr`` trailer when present, otherwise the
topology is reloaded) or on UNAVAILABLE / DEADLINE_EXCEEDED (topology reloaded), sleeping
250 ms, then twice as long each time up to 5 s. Nothing else is retried by the client;
RESOURCE_EXHAUSTED is retried by gRPC itself (service config, 5 attempts).

Channels are grpc.aio channels, created inside the running event loop on first use, so a
client belongs to one event loop (use :mod:`silo.client.sync` from threads/scripts).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.client.errors import (
    OWNER_TRAILER,
    SiloError,
    TopologyError,
    from_rpc_error,
    is_connectivity,
    is_wrong_shard,
    trailers_of,
)
from silo.client.routing import ShardInfo, Topology, hash_tenant

MAX_MESSAGE_BYTES = 128 * 1024 * 1024
SERVICE = "silo.v1.Silo"
_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": SERVICE}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "5s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]},
}]})

Token = str | Callable[[], str | Awaitable[str]] | None


def default_channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Keepalive every 5 s even when idle (1 s timeout), 128 MiB messages, gRPC-level
    retry of RESOURCE_EXHAUSTED."""
    return [
        ("grpc.keepalive_time_ms", 5000),
        ("grpc.keepalive_timeout_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _SERVICE_CONFIG),
    ]


@dataclass(slots=True)
class ClientStats:
    wrong_shard_retries: int = 0
    connectivity_retries: int = 0
    topology_refreshes: int = 0


class _Conn:
    __slots__ = ("addr", "channel", "stub")

    def __init__(self, addr: str, channel: grpc.aio.Channel) -> None:
        self.addr = addr
        self.channel = channel
        self.stub = pb_grpc.SiloStub(channel)


def _normalize_servers(servers: str | Sequence[str | tuple[str, int]]) -> list[str]:
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    out = []
    for s in servers:
        out.append(f"{s[0]}:{s[1]}" if isinstance(s, tuple) else str(s))
    if not out:
        raise ValueError("SiloClient needs at least one server address")
    return out


class ClusterConnection:
    """Channels to a Silo cluster and the routed, retried call paths over them.

    Holds no job operations: those are :class:`silo.client.SiloClient`'s (its docstring
    lists these constructor arguments).
    """

    def __init__(
        self,
        servers: str | Sequence[str | tuple[str, int]],
        *,
        token: Token = None,
        tls: bool | grpc.ChannelCredentials = False,
        max_retries: int = 8,
        retry_delay_s: float = 0.25,
        max_retry_delay_s: float = 5.0,
        topology_refresh_interval_s: float = 30.0,
        topology_refresh_timeout_s: float = 10.0,
        rpc_timeout_s: float | None = 30.0,
        address_map: dict[str, str] | Callable[[str], str] | None = None,
        channel_options: Sequence[tuple[str, Any]] | None = None,
    ) -> None:
        self.seeds = _normalize_servers(servers)
        self.max_retries = max_retries
        self.retry_delay_s = retry_delay_s
        self.max_retry_delay_s = max_retry_delay_s
        self.topology_refresh_interval_s = topology_refresh_interval_s
        self.topology_refresh_timeout_s = topology_refresh_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.stats = ClientStats()
        if isinstance(address_map, dict):
            mapping = dict(address_map)
            self._address_map: Callable[[str], str] | None = lambda a: mapping.get(a, a)
        else:
            self._address_map = address_map
        if tls is True:
            self._creds: grpc.ChannelCredentials | None = grpc.ssl_channel_credentials()
        elif isinstance(tls, grpc.ChannelCredentials):
            self._creds = tls
        else:
            self._creds = None
        self._options = (list(channel_options) if channel_options is not None
                         else default_channel_options())
        self._token = token
        self._static_md: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if isinstance(token, str) else
            None if token is not None else ())
        self._conns: dict[str, _Conn] = {}
        self._rr = itertools.count()
        self._topology: Topology | None = None
        self._loading: asyncio.Future[Topology] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the periodic refresh and close every channel (in-flight calls are cancelled)."""
        self._closed = True
        if self._periodic is not None:
            self._periodic.cancel()
            self._periodic = None
        conns, self._conns = list(self._conns.values()), {}
        for t in list(self._background):
            t.cancel()
        await asyncio.gather(*(c.channel.close() for c in conns), return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # ---- connections -------------------------------------------------------------------

    def _conn(self, addr: str) -> _Conn:
        c = self._conns.get(addr)
        if c is None:
            if self._closed:
                raise SiloError("SiloClient is closed")
            if self._creds is not None:
                ch = grpc.aio.secure_channel(addr, self._creds, options=self._options)
            else:
                ch = grpc.aio.insecure_channel(addr, options=self._options)
            c = self._conns[addr] = _Conn(addr, ch)
        return c

    def _any_conn(self, index: int | None = None) -> _Conn:
        conns = list(self._conns.values())
        if not conns:
            return self._conn(self.seeds[0])
        i = next(self._rr) if index is None else index
        return conns[i % len(conns)]

    def _spawn(self, coro: Awaitable[Any]) -> None:
        t = asyncio.ensure_future(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    async def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._static_md is not None:
            return self._static_md
        tok = self._token() if callable(self._token) else self._token
        if inspect.isawaitable(tok):
            tok = await tok
        return (("authorization", f"Bearer {tok}"),) if tok else ()

    @property
    def addresses(self) -> list[str]:
        """Addresses of the current connections (the advertised ones once discovered)."""
        return list(self._conns)

    # ---- topology ----------------------------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        return self._topology

    async def get_topology(self) -> Topology:
        t = self._topology
        return t if t is not None else await self.refresh_topology()

    async def refresh_topology(self) -> Topology:
        """Reload the shard map from GetClusterInfo; concurrent callers share one load."""
        fut = self._loading
        if fut is None:
            fut = self._loading = asyncio.ensure_future(self._load_topology())

            def _clear(f: asyncio.Future[Topology]) -> None:
                if self._loading is f:
                    self._loading = None
                if not f.cancelled():
                    f.exception()  # mark retrieved
            fut.add_done_callback(_clear)
        return await asyncio.shield(fut)

    async def _load_topology(self) -> Topology:
        candidates = list(self._conns) + [s for s in self.seeds if s not in self._conns]
        md = await self._metadata()
        last: grpc.RpcError | None = None
        last_addr = ""
        for addr in candidates:
            try:
                info = await self._conn(addr).stub.GetClusterInfo(
                    pb.GetClusterInfoRequest(), timeout=self.topology_refresh_timeout_s,
                    metadata=md)
            except grpc.RpcError as e:
                last, last_addr = e, addr
                continue
            self._install(Topology.from_cluster_info(info, self._address_map))
            assert self._topology is not None
            return self._topology
        detail = ""
        code = None
        if last is not None:
            err = from_rpc_error(last)
            code = err.code
            detail = f" (last: {last_addr}: {err.code_name}: {err.message})"
        raise TopologyError(f"Failed to refresh cluster topology from any server{detail}", code)

    def _install(self, topo: Topology) -> None:
        self.stats.topology_refreshes += 1
        advertised = set(topo.addresses)
        for a in topo.addresses:
            self._conn(a)
        for a in [a for a in self._conns if a not in advertised]:
            # Not advertised (e.g. a seed alias): close it, letting in-flight calls finish.
            self._spawn(self._conns.pop(a).channel.close(grace=5.0))
        self._topology = topo
        if self._periodic is None and self.topology_refresh_interval_s > 0 and not self._closed:
            self._periodic = asyncio.ensure_future(self._refresh_periodically())

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.topology_refresh_interval_s)
            # On failure keep the last good topology; routed calls retry on their own.
            with contextlib.suppress(SiloError, grpc.RpcError):
                await self.refresh_topology()

    async def shard_for_tenant(self, tenant: str | None) -> ShardInfo:
        """The shard (id, owner address, range) that serves this tenant."""
        return (await self.get_topology()).shard_for_key(hash_tenant(tenant))

    async def get_cluster_info(self) -> pb.GetClusterInfoResponse:
        """The raw GetClusterInfo reply of one server (round-robin)."""
        return await self._unrouted("GetClusterInfo", pb.GetClusterInfoRequest())

    # ---- call machinery -----------------------------------------------------------------

    async def _backoff(self, attempt: int, e: grpc.RpcError, shard_id: str | None) -> None:
        """Sleep, then repair routing after a retryable error (attempt counts from 1)."""
        delay = min(self.retry_delay_s * (2 ** (attempt - 1)), self.max_retry_delay_s)
        await asyncio.sleep(delay)
        code, msg = e.code(), e.details() or ""
        if is_wrong_shard(code, msg):
            self.stats.wrong_shard_retries += 1
            owner = trailers_of(e).get(OWNER_TRAILER)
            topo = self._topology
            if owner and shard_id is not None and topo is not None and shard_id in topo.by_id:
                if self._address_map is not None:
                    owner = self._address_map(owner)
                topo.set_owner(shard_id, owner)
                self._conn(owner)
                return
        else:
            self.stats.connectivity_retries += 1
        await self.refresh_topology()

    @staticmethod
    def _retryable(e: grpc.RpcError) -> bool:
        code, msg = e.code(), e.details() or ""
        return is_wrong_shard(code, msg) or is_connectivity(code, msg)

    async def _routed(self, key: str, method: str, req: Any, *, op: str = "",
                      job_id: str | None = None, tenant: str | None = None,
                      prepare: Callable[[str], None] | None = None) -> Any:
        """Send ``req`` to the shard owning hash ``key``; its ``shard`` field is set here
        (or ``prepare(shard_id)`` is called instead)."""
        attempt = 0
        md = self._static_md if self._static_md is not None else await self._metadata()
        while True:
            topo = self._topology
            if topo is None:
                topo = await self.refresh_topology()
            shard = topo.shard_for_key(key)
            if prepare is None:
                req.shard = shard.shard_id
            else:
                prepare(shard.shard_id)
            conn = self._conns.get(shard.grpc_addr) or self._conn(shard.grpc_addr)
            try:
                return await getattr(conn.stub, method)(req, timeout=self.rpc_timeout_s,
                                                        metadata=md)
            except grpc.RpcError as e:
                if attempt >= self.max_retries or not self._retryable(e):
                    raise from_rpc_error(e, op=op, job_id=job_id, tenant=tenant) from e
                attempt += 1
                await self._backoff(attempt, e, shard.shard_id)

    async def _by_shard(self, shard_id: str, method: str, req: Any, *, op: str = "") -> Any:
        """Send ``req`` to the owner of ``shard_id`` (round-robin when it is unknown)."""
        attempt = 0
        md = self._static_md if self._static_md is not None else await self._metadata()
        while True:
            topo = self._topology
            if topo is None:
                topo = await self.refresh_topology()
            s = topo.by_id.get(shard_id)
            conn = (self._conns.get(s.grpc_addr) or self._conn(s.grpc_addr)) if s else \
                self._any_conn()
            try:
                return await getattr(conn.stub, method)(req, timeout=self.rpc_timeout_s,
                                                        metadata=md)
            except grpc.RpcError as e:
                if attempt >= self.max_retries or not self._retryable(e):
                    raise from_rpc_error(e, op=op) from e
                attempt += 1
                await self._backoff(attempt, e, shard_id)

    async def _unrouted(self, method: str, req: Any, *, index: int | None = None,
                        timeout: float | None = -1.0) -> Any:
        """Send ``req`` to one server (round-robin, or the ``index``-th connection)."""
        attempt = 0
        md = self._static_md if self._static_md is not None else await self._metadata()
        if self._topology is None:
            await self.refresh_topology()
        while True:
            conn = self._any_conn(None if index is None else index + attempt)
            try:
                return await getattr(conn.stub, method)(
                    req, timeout=self.rpc_timeout_s if timeout == -1.0 else timeout,
                    metadata=md)
            except grpc.RpcError as e:
                if attempt >= self.max_retries or not is_connectivity(e.code(),
                                                                      e.details() or ""):
                    raise from_rpc_error(e) from e
                attempt += 1
                await self._backoff(attempt, e, None)
