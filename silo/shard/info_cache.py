"""Recently enqueued jobs' info, kept in memory so leasing them needs no storage read.

A job is usually leased soon after it is enqueued; its JobInfo (payload, metadata,
limits) was just built by Enqueue. Keeping it here until the job ends saves a SlateDB
`get` (an async FFI round trip, the dearest part of a lease) per leased task. Bounded
by payload bytes: past the budget the oldest entries go, and leasing falls back to
reading storage, so correctness never depends on the cache.

An entry also remembers the job's latest status once `Shard.put_status` (the one writer
of a job's status row) has written one after the info was cached, so GetJob of a job in
the cache needs no storage read at all (two async FFI gets were ~60 % of its server
CPU). A status is only ever the one just staged: `put` forgets it, and so do `discard`,
eviction and `Shard.drop_status` (DeleteJob); without one, GetJob reads the row from storage.

Infos read ahead of a lease (silo.shard.prefetch) come in through `begin_fetch` /
`put_fetched`: a `put` or `discard` of the job while its read is in flight cancels the
fetch, so a read that started before the job changed never overwrites what changed it.
"""

from __future__ import annotations

from silo.storage.records import JobInfo, JobStatus

# Bytes per entry beyond the payload (tracemalloc: ~430 with a tiny one, and ~145 for
# the remembered status).
_ENTRY_OVERHEAD = 580


class InfoCache:
    __slots__ = ("_entries", "_bytes", "budget", "_status", "_fetching")

    def __init__(self, budget_bytes: int) -> None:
        self._entries: dict[tuple[str, str], JobInfo] = {}
        self._status: dict[tuple[str, str], JobStatus] = {}
        self._bytes = 0
        self.budget = budget_bytes
        self._fetching: set[tuple[str, str]] = set()  # prefetch reads in flight

    def put(self, info: JobInfo) -> None:
        key = (info.tenant, info.id)
        self._status.pop(key, None)  # only a status staged after this put is known
        self._fetching.discard(key)  # a read in flight is older than this info
        size = len(info.payload) + _ENTRY_OVERHEAD
        if size > self.budget:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.payload) + _ENTRY_OVERHEAD
        self._entries[key] = info
        self._bytes += size
        while self._bytes > self.budget:
            gone, evicted = _pop_oldest(self._entries)
            self._status.pop(gone, None)
            self._bytes -= len(evicted.payload) + _ENTRY_OVERHEAD

    def get(self, tenant: str, job_id: str) -> JobInfo | None:
        return self._entries.get((tenant, job_id))

    def put_status(self, tenant: str, job_id: str, status: JobStatus) -> None:
        """Remember the status just staged for a cached job (nothing for another job)."""
        key = (tenant, job_id)
        if key in self._entries:
            self._status[key] = status

    def status(self, tenant: str, job_id: str) -> JobStatus | None:
        """The job's latest staged status, when it was staged while the job was cached."""
        return self._status.get((tenant, job_id))

    def begin_fetch(self, key: tuple[str, str]) -> bool:
        """A prefetch read of key starts (False: one is in flight already)."""
        if key in self._fetching:
            return False
        self._fetching.add(key)
        return True

    def end_fetch(self, key: tuple[str, str]) -> None:
        self._fetching.discard(key)

    def put_fetched(self, info: JobInfo) -> None:
        """A prefetch read came back: cache it unless the job was put or discarded since."""
        key = (info.tenant, info.id)
        if key in self._fetching:
            self._fetching.discard(key)
            if key not in self._entries:
                self.put(info)

    def discard(self, tenant: str, job_id: str) -> None:
        self._fetching.discard((tenant, job_id))
        self._status.pop((tenant, job_id), None)
        old = self._entries.pop((tenant, job_id), None)
        if old is not None:
            self._bytes -= len(old.payload) + _ENTRY_OVERHEAD

    def clear(self) -> None:
        self._entries.clear()
        self._fetching.clear()
        self._status.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


def _pop_oldest(d: dict[tuple[str, str], JobInfo]) -> tuple[tuple[str, str], JobInfo]:
    key = next(iter(d))
    return key, d.pop(key)
