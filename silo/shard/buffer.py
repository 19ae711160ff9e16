"""The ready buffer of one (shard, task group): the earliest task keys, refilled from storage.

Pending tasks live in storage (0x05 rows, in ready order: start time, priority, job id,
attempt). Memory holds at most about `size` of the earliest ones, so a shard with a
million queued jobs costs what one with a few thousand does (upstream's broker,
behaviour.md §4). The invariant that makes this exact:

* `cursor`: every live task key of the group that is <= cursor is in `tasks` (or in
  `refresh`); keys above it are only in storage. `complete` means "no bound": every
  live key of the group is in memory.
* An added task goes into memory when it falls at or below the cursor (or the buffer is
  complete); a removed one leaves memory at once, so a popped key is always live.
* A refill scans storage from just after the cursor, overlays the writes not yet applied
  to the database and every add/remove made while the scan was awaited (the journal),
  takes what falls in the scanned range and moves the cursor to its end.
* Past 2 × size tasks (adds below the cursor, or a complete buffer that grew) the
  largest keys are dropped and the cursor lowered to the last key kept.

Floating-limit refresh tasks sit in the same key range but are kept apart (`refresh`),
so a full LeaseTasks still hands them out; those added at runtime stay in memory
whatever their key (there is one per floating limit at most).

One refill runs at a time per buffer. A LeaseTasks that finds fewer buffered tasks than
it asks for waits for one; below the low-water mark (size / 2) a refill starts in the
background, off the lease call's path.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from typing import TYPE_CHECKING

from slatedb.uniffi import KeyRange

from silo.storage import keys
from silo.storage.records import RefreshFloatingLimit, Task, task_decoder

if TYPE_CHECKING:
    from silo.shard.state import Shard

log = logging.getLogger(__name__)

FIRST_REFILL = 256


class ReadyBuffer:
    __slots__ = ("task_group", "prefix", "end", "prefix_len", "size", "tasks", "heap",
                 "refresh", "refresh_heap", "cursor", "complete", "journal", "_refill",
                 "_dead", "refills", "scanned", "fetched_ahead")

    def __init__(self, task_group: str, size: int) -> None:
        self.task_group = task_group
        self.prefix = keys.task_group_prefix(task_group)
        self.end = keys.prefix_end(self.prefix)
        self.prefix_len = len(self.prefix)
        self.size = max(1, size)
        self.tasks: dict[bytes, Task] = {}
        self.heap: list[bytes] = []  # keys of `tasks`, plus removed ones skipped when met
        self.refresh: dict[bytes, Task] = {}
        self.refresh_heap: list[bytes] = []
        self.cursor = self.prefix  # nothing scanned yet: every key is above it
        self.complete = False
        self.journal: dict[bytes, Task | None] | None = None  # while a refill is awaited
        self._refill: asyncio.Future[None] | None = None
        self._dead = 0
        self.refills = 0
        # Keys a refill brought in from storage, in key order (= lease order): their
        # infos may not be cached, so silo.shard.prefetch reads the next few ahead.
        self.scanned: deque[bytes] = deque()
        self.fetched_ahead = 0  # entries at the front of `scanned` already looked at

    # ---- synchronous changes (the shard's state-machine steps) -------------------

    def add(self, key: bytes, task: Task) -> None:
        if self.journal is not None:
            self.journal[key] = task
        if isinstance(task, RefreshFloatingLimit):
            if key not in self.refresh:
                heapq.heappush(self.refresh_heap, key)
            self.refresh[key] = task
            return
        if self.complete or key <= self.cursor:
            if key not in self.tasks:
                heapq.heappush(self.heap, key)
            self.tasks[key] = task
            if len(self.tasks) > 2 * self.size and self.journal is None:
                self._trim()

    def remove(self, key: bytes) -> Task | None:
        """Forget a task that left storage; returns it if it was in memory."""
        if self.journal is not None:
            self.journal[key] = None
        task = self.tasks.pop(key, None)
        if task is None:
            task = self.refresh.pop(key, None)
        if task is not None:
            self._dead += 1
            if self._dead > self.size and self._dead * 2 > len(self.heap):
                self.heap = sorted(self.tasks)
                self.refresh_heap = sorted(self.refresh)
                self._dead = 0
        return task

    def get(self, key: bytes) -> Task | None:
        task = self.tasks.get(key)
        return task if task is not None else self.refresh.get(key)

    def pop_due(self, now: int, limit: int | None = None, refresh: bool = False
                ) -> list[tuple[bytes, Task]]:
        """Take due tasks in key order (the caller stages their deletes)."""
        heap, live = (self.refresh_heap, self.refresh) if refresh else (self.heap, self.tasks)
        out: list[tuple[bytes, Task]] = []
        plen = self.prefix_len
        while heap and (limit is None or len(out) < limit):
            key = heap[0]
            if key not in live:
                heapq.heappop(heap)
                self._dead = max(0, self._dead - 1)
                continue
            if keys.task_start_ms(key, plen) > now:
                break
            heapq.heappop(heap)
            out.append((key, live.pop(key)))
            if self.journal is not None:
                self.journal[key] = None
        return out

    def pop_one(self, now: int) -> tuple[bytes, Task] | None:
        """`pop_due(now, limit=1)` without the list: the first due task, or None (a
        lease takes its tasks one at a time, so this runs once per leased task)."""
        heap, live = self.heap, self.tasks
        plen = self.prefix_len
        while heap:
            key = heap[0]
            if key not in live:
                heapq.heappop(heap)
                if self._dead:
                    self._dead -= 1
                continue
            if int.from_bytes(key[plen:plen + 8], "big") > now:  # keys.task_start_ms
                return None
            heapq.heappop(heap)
            if self.journal is not None:
                self.journal[key] = None
            return key, live.pop(key)
        return None

    def head_ms(self) -> int | None:
        """Start time of the earliest buffered task (None: nothing buffered)."""
        best = None
        for heap, live in ((self.heap, self.tasks), (self.refresh_heap, self.refresh)):
            while heap and heap[0] not in live:
                heapq.heappop(heap)
            if heap:
                t = keys.task_start_ms(heap[0], self.prefix_len)
                best = t if best is None or t < best else best
        return best

    def live(self, key: bytes, committer) -> bool:
        """Whether a task key of this group is still pending (in memory, or above the
        cursor and not deleted by a write that has not reached the database yet)."""
        if key in self.tasks or key in self.refresh:
            return True
        if self.complete or key <= self.cursor:
            return False
        found, value = committer.staged_value(key)
        return not found or value is not None

    def _trim(self) -> None:
        ordered = sorted(self.tasks)
        keep = ordered[: self.size]
        for k in ordered[self.size :]:
            del self.tasks[k]
        self.heap = keep  # a sorted list is a heap
        self.cursor = keep[-1]
        self.complete = False
        self._dead = 0

    def __len__(self) -> int:
        return len(self.tasks)

    # ---- refilling from storage ------------------------------------------------------

    def needs_refill(self) -> bool:
        return not self.complete and len(self.tasks) < self.size // 2 + 1

    def refill_soon(self, shard: Shard) -> None:
        """Start a background refill if the buffer is low and none is running."""
        if self.needs_refill() and self._refill is None:
            asyncio.ensure_future(self.refill(shard))

    async def refill(self, shard: Shard) -> None:
        """Read the next keys after the cursor (one refill at a time; a second caller
        waits for the one running)."""
        if self.complete:
            return
        if self._refill is not None:
            await asyncio.shield(self._refill)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refill = fut
        try:
            await self._scan(shard)
        except Exception as exc:  # noqa: BLE001 - a failed scan leaves the buffer as it was
            log.error("shard %s: refilling task group %r failed: %r", shard.id,
                      self.task_group, exc)
        finally:
            self._refill = None
            fut.set_result(None)

    async def _scan(self, shard: Shard) -> None:
        start = self.cursor
        # The first refill of a buffer (at open, typically) reads a small head so the
        # first lease waits for little; the background refill after it reads the rest.
        want = self.size if self.refills else min(self.size, FIRST_REFILL)
        pending = shard.committer.unapplied()
        self.journal = {}
        try:
            rows: list = []
            it = await shard.db.scan(KeyRange(start=start, start_inclusive=False,
                                              end=self.end, end_inclusive=False))
            while len(rows) < want:
                got = await it.next_batch(want - len(rows))
                if not got:
                    break
                rows.extend(got)
        finally:
            journal, self.journal = self.journal, None
        complete = len(rows) < want
        last = None if complete else rows[-1].key
        prefix = self.prefix
        found: dict[bytes, bytes | Task | None] = {r.key: r.value for r in rows}
        for writes in pending:
            for k, v in writes.items():
                if k > start and k.startswith(prefix) and (last is None or k <= last):
                    found[k] = v
        for k, t in journal.items():
            if k > start and (last is None or k <= last):
                found[k] = t
        added: list[bytes] = []
        for k, v in found.items():
            if v is None or k in self.tasks:
                continue
            task = task_decoder.decode(v) if isinstance(v, bytes) else v
            if isinstance(task, RefreshFloatingLimit):
                if k not in self.refresh:
                    self.refresh[k] = task
                    heapq.heappush(self.refresh_heap, k)
                continue
            self.tasks[k] = task
            heapq.heappush(self.heap, k)
            added.append(k)
        self._note_scanned(added)
        if complete:
            self.complete = True
        else:
            assert last is not None
            self.cursor = last
        self.refills += 1
        # No trim here: a refill runs when the buffer is low or a lease wants more than it
        # holds, and reads at most `size` rows, so it stays within size + the call's max.
        if added or self.refresh:
            shard.ready.notify(self.task_group)

    def _note_scanned(self, added: list[bytes]) -> None:
        """Queue a refill's new keys for prefetching, in order after the ones still held
        (a refill reads above the cursor, so they sort after every earlier scanned key)."""
        if not added:
            return
        added.sort()  # the scan's rows are sorted; only overlaid writes may be out of place
        q = self.scanned
        if len(q) + len(added) > 2 * self.size:  # trimmed or removed keys piled up
            live = [k for k in q if k in self.tasks]
            q.clear()
            q.extend(live)
            self.fetched_ahead = min(self.fetched_ahead, len(q))
        q.extend(added)
