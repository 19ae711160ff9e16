"""Every worker process's state as the supervisor sees it, in shared memory.

The supervisor maps the table before forking and is its only writer; workers read it
to answer gRPC health (NOT_SERVING while any process is down or unresponsive), to skip
an unresponsive peer in LeaseTasks and to fail fast instead of waiting on it. Restart
counts live here too, so whoever exports metrics from a worker can read them
(`ProcessTable.restarts(i)`, `ProcessTable.snapshot()`).

One 16-byte slot per worker: state (int32), pid (int32), restarts (int64). Single
aligned word writes, so a reader never sees a torn value.
"""

from __future__ import annotations

import mmap
import struct

DOWN = 0  # not running (crashed, killed, waiting for its restart back-off)
STARTING = 1  # forked, opening its shards
SERVING = 2
UNRESPONSIVE = 3  # running but missed liveness pings
STOPPING = 4  # draining for a graceful stop

STATE_NAMES = {DOWN: "down", STARTING: "starting", SERVING: "serving",
               UNRESPONSIVE: "unresponsive", STOPPING: "stopping"}

_SLOT = 16
_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")


class ProcessTable:
    def __init__(self, n: int) -> None:
        self.n = n
        self._mem = mmap.mmap(-1, _SLOT * max(1, n))

    # ---- the supervisor's side ----------------------------------------------------

    def set_state(self, index: int, state: int) -> None:
        _I32.pack_into(self._mem, index * _SLOT, state)

    def set_pid(self, index: int, pid: int) -> None:
        _I32.pack_into(self._mem, index * _SLOT + 4, pid)

    def count_restart(self, index: int) -> None:
        _I64.pack_into(self._mem, index * _SLOT + 8, self.restarts(index) + 1)

    # ---- anyone's ---------------------------------------------------------------------

    def state(self, index: int) -> int:
        return _I32.unpack_from(self._mem, index * _SLOT)[0]

    def pid(self, index: int) -> int:
        return _I32.unpack_from(self._mem, index * _SLOT + 4)[0]

    def restarts(self, index: int) -> int:
        """How many times the supervisor restarted worker `index` since the server started."""
        return _I64.unpack_from(self._mem, index * _SLOT + 8)[0]

    def all_serving(self) -> bool:
        return all(self.state(i) == SERVING for i in range(self.n))

    def snapshot(self) -> list[dict[str, object]]:
        """One dict per worker: index, state name, pid, restarts (for metrics / debugging)."""
        return [{"index": i, "state": STATE_NAMES.get(self.state(i), "?"), "pid": self.pid(i),
                 "restarts": self.restarts(i)} for i in range(self.n)]
