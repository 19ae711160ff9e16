"""Back-pressure: a bound on the request bytes a worker process holds at once.

Without it, 64 concurrent 10 MiB Enqueues grow a worker by gigabytes (each payload is
copied from gRPC into protobuf, into the job record, into SlateDB's write batch, memtable
and WAL buffer) and stall its event loop. With it, a call that would take the process
past `max_inflight_bytes` is answered RESOURCE_EXHAUSTED (Silo's clients retry that with
back-off) before its body is even decoded, and its bytes are dropped at once.

The check runs on the raw request bytes: each unary Silo method is registered with a
pass-through deserializer (silo.rpc.server), which checks the token, admits, then lets the
service's `rpc` wrapper decode and serve, and releases.
Calls forwarded from a sibling process are admitted the same way (`guard_dispatch`), so
a process's memory is bounded whichever port the bytes came in on. Admission never
waits: a rejected call costs nothing, and a forwarded call cannot deadlock two busy
processes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable

import grpc

from silo.errors import SiloError
from silo.rpc.memtrim import Trimmer, trim_threshold

log = logging.getLogger(__name__)

_LOG_EVERY_S = 10.0

# Calls that never write: still served while this process's storage is stalled.
READ_ONLY = frozenset({"GetClusterInfo", "GetNodeInfo", "GetJob", "GetJobResult", "Query",
                       "QueryArrow", "CpuProfile"})


class Admission:
    """Counts request bytes in flight; admits a call only while the total stays under
    the bound. One call bigger than the whole bound is admitted when nothing else is in
    flight, so no valid message (up to max_message_bytes) is refused forever."""

    __slots__ = ("max_bytes", "inflight", "peak", "admitted", "rejected", "_logged_at",
                 "storage_stalled", "high", "on_drained")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # Set while a shard of this process cannot make writes durable: writing calls
        # are refused before they stage anything, so a stuck disk holds no more memory.
        self.storage_stalled = False
        self.inflight = 0
        self.peak = 0
        self.admitted = 0
        self.rejected = 0
        self._logged_at = -_LOG_EVERY_S
        # Peak since in-flight bytes were last zero; reported to on_drained (memory trim).
        self.high = 0
        self.on_drained: Callable[[int], None] | None = None

    def try_acquire(self, n: int) -> bool:
        if self.inflight and self.inflight + n > self.max_bytes:
            self.rejected += 1
            return False
        self.inflight += n
        self.admitted += 1
        if self.inflight > self.peak:
            self.peak = self.inflight
        if self.inflight > self.high:
            self.high = self.inflight
        return True

    def release(self, n: int) -> None:
        self.inflight -= n
        if self.inflight == 0 and self.high:
            high, self.high = self.high, 0
            if self.on_drained is not None:
                self.on_drained(high)

    def check(self, method: str, n: int) -> None:
        """Admit a call of n request bytes or raise the SiloError that refuses it."""
        if self.storage_stalled and method not in READ_ONLY:
            raise SiloError(grpc.StatusCode.UNAVAILABLE,
                            "shard storage stalled (disk full or object store unreachable?); "
                            "writes are refused until it recovers")
        if not self.try_acquire(n):
            raise self.busy_error(n)

    def busy_error(self, n: int) -> SiloError:
        """The RESOURCE_EXHAUSTED answer; logs at most one line per 10 s."""
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("back-pressure: refusing calls with RESOURCE_EXHAUSTED (%d bytes in "
                        "flight, max_inflight_bytes %d; %d refused so far)",
                        self.inflight, self.max_bytes, self.rejected)
        return SiloError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                         f"server busy: {self.inflight} request bytes in flight, a "
                         f"{n}-byte request would pass max_inflight_bytes "
                         f"({self.max_bytes}); retry with back-off")


def guard_dispatch(dispatch: Callable[..., Awaitable], admission: Admission):
    """The peer-socket dispatcher behind the same bound (forwarded calls' bytes)."""

    @functools.wraps(dispatch)
    async def guarded(method: str, payload: bytes, *rest):
        n = len(payload)
        admission.check(method.partition("@")[0], n)
        try:
            return await dispatch(method, payload, *rest)
        finally:
            admission.release(n)

    return guarded


def process_admission(max_inflight_bytes: int) -> Admission:
    """The one Admission of a worker process (public port and peer socket share it); it
    gives freed memory back to the OS after a big burst (silo.rpc.memtrim)."""
    admission = Admission(max_inflight_bytes)
    admission.on_drained = Trimmer(trim_threshold(max_inflight_bytes)).drained
    return admission
