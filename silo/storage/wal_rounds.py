"""One event loop's C fsync rounds (silo.storage._walsync): carries a round to the C
threads and its result back to whoever submitted it.

silo.storage.local_sync decides when a round runs, what it covers and what its result
means; this module is only the plumbing between the loop and `_walsync.Rounds`: the
eventfd the loop watches, and which owner each result is for (a token per round), so a
result is handed on from the loop's reader callback with no task or future.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Protocol

try:
    from silo.storage import _walsync
except ImportError:  # built as an optional extension (setup.py): the pool path then
    _walsync = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

AVAILABLE = _walsync is not None  # the C module is built


class RoundOwner(Protocol):
    """What submits a round (local_sync.LocalSync) and takes its result."""

    db_dir: str

    def native_done(self, next_id: int, err: int, ns: int) -> None: ...


_tokens = itertools.count(1)


class NativeRounds:
    """One event loop's _walsync.Rounds: its eventfd is watched by the loop, whose
    drain hands each result to the owner that submitted the round."""

    def __init__(self, loop: asyncio.AbstractEventLoop, overlap: bool) -> None:
        self.native = _walsync.Rounds(overlap=overlap)
        self.pending: dict[int, RoundOwner] = {}
        loop.add_reader(self.native.fileno(), self.drain)

    def submit(self, s: RoundOwner, wal_fd: int, start: int) -> None:
        token = next(_tokens)
        self.pending[token] = s
        self.native.submit(token, wal_fd, start)

    def drain(self) -> None:
        pop = self.pending.pop
        for token, next_id, err, ns in self.native.drain():
            s = pop(token, None)
            if s is None:
                continue
            try:
                s.native_done(next_id, err, ns)
            except Exception:  # noqa: BLE001 - the other results must still be handed on
                log.exception("fsync round result of %s", s.db_dir)
