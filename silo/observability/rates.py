"""Per-task-group event counts of the last 15 minutes, in 10-second buckets, per process.

The web UI's task-group chart (enqueued and completed per second) needs a short
history that Prometheus counters do not keep in the server: those are totals, and the
server scrapes nothing. So each worker process counts the two events per task group
into a ring of `BUCKETS` buckets of `BUCKET_S` seconds; the web UI asks every process
of the node for its ring (silo.web.stats) and adds them up.

Bounded memory: at most `MAX_GROUPS` task groups are tracked (then "(other)" takes the
rest), each with two rings of `BUCKETS` integers. The hot-path cost is one dict lookup
and two integer additions per event.
"""

from __future__ import annotations

import time

BUCKET_S = 10
BUCKETS = 90  # 15 minutes
MAX_GROUPS = 256
OTHER = "(other)"

ENQUEUED = 0
COMPLETED = 1


class Rates:
    """Rings of per-bucket counts per task group; bucket `b` covers seconds
    [b * BUCKET_S, (b + 1) * BUCKET_S) of the epoch and lives at index b % BUCKETS."""

    def __init__(self, clock=time.time) -> None:
        self.clock = clock
        # group → [ring of enqueued, ring of completed, bucket number of each slot]
        self.groups: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def _ring(self, group: str) -> tuple[list[int], list[int], list[int]]:
        r = self.groups.get(group)
        if r is None:
            if len(self.groups) >= MAX_GROUPS and group != OTHER:
                return self._ring(OTHER)
            r = self.groups[group] = ([0] * BUCKETS, [0] * BUCKETS, [-1] * BUCKETS)
        return r

    def add(self, group: str, event: int, n: int = 1) -> None:
        b = int(self.clock()) // BUCKET_S
        r = self._ring(group)
        i = b % BUCKETS
        if r[2][i] != b:  # a slot from an older lap of the ring: start it afresh
            r[0][i] = r[1][i] = 0
            r[2][i] = b
        r[event][i] += n

    def snapshot(self) -> dict[str, object]:
        """{"now": current bucket, "groups": {group: [[b, enq, done], ...]}} with the
        buckets of the last 15 minutes that saw an event (plain lists: msgpack-able)."""
        now = int(self.clock()) // BUCKET_S
        out: dict[str, list[list[int]]] = {}
        for g, (enq, done, nums) in list(self.groups.items()):
            rows = [[nums[i], enq[i], done[i]] for i in range(BUCKETS)
                    if now - BUCKETS < nums[i] <= now and (enq[i] or done[i])]
            if rows:
                out[g] = rows
        return {"now": now, "groups": out}


RATES = Rates()


def enqueued(task_group: str, n: int = 1) -> None:
    RATES.add(task_group, ENQUEUED, n)


def completed(task_group: str, n: int = 1) -> None:
    RATES.add(task_group, COMPLETED, n)


def merge(snapshots: list[dict]) -> tuple[int, dict[str, tuple[list[int], list[int]]]]:
    """Sum the snapshots of several processes → (current bucket, {group: (enqueued per
    bucket, completed per bucket)}) with BUCKETS entries each, oldest first."""
    now = max((int(s["now"]) for s in snapshots), default=int(time.time()) // BUCKET_S)
    first = now - BUCKETS + 1
    out: dict[str, tuple[list[int], list[int]]] = {}
    for s in snapshots:
        for g, rows in s["groups"].items():
            enq, done = out.setdefault(str(g), ([0] * BUCKETS, [0] * BUCKETS))
            for b, e, d in rows:
                if first <= b <= now:
                    enq[b - first] += e
                    done[b - first] += d
    return now, out
