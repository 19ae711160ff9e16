"""Recently enqueued jobs' info, kept in memory so leasing them needs no storage read.

A job is usually leased soon after it is enqueued; its JobInfo (payload, metadata,
limits) was just built by Enqueue. Keeping it here until the job ends saves a SlateDB
`get` (an async FFI round trip, the dearest part of a lease) per leased task. Bounded
by payload bytes: past the budget the oldest entries go, and leasing falls back to
reading storage, so correctness never depends on the cache.
"""

from __future__ import annotations

from silo.storage.records import JobInfo

_ENTRY_OVERHEAD = 420  # bytes per entry beyond the payload (tracemalloc: ~430 with a tiny one)


class InfoCache:
    __slots__ = ("_entries", "_bytes", "budget")

    def __init__(self, budget_bytes: int) -> None:
        self._entries: dict[tuple[str, str], JobInfo] = {}
        self._bytes = 0
        self.budget = budget_bytes

    def put(self, info: JobInfo) -> None:
        size = len(info.payload) + _ENTRY_OVERHEAD
        if size > self.budget:
            return
        key = (info.tenant, info.id)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.payload) + _ENTRY_OVERHEAD
        self._entries[key] = info
        self._bytes += size
        while self._bytes > self.budget:
            _, evicted = _pop_oldest(self._entries)
            self._bytes -= len(evicted.payload) + _ENTRY_OVERHEAD

    def get(self, tenant: str, job_id: str) -> JobInfo | None:
        return self._entries.get((tenant, job_id))

    def discard(self, tenant: str, job_id: str) -> None:
        old = self._entries.pop((tenant, job_id), None)
        if old is not None:
            self._bytes -= len(old.payload) + _ENTRY_OVERHEAD

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _pop_oldest(d: dict[tuple[str, str], JobInfo]) -> tuple[tuple[str, str], JobInfo]:
    key = next(iter(d))
    return key, d.pop(key)
