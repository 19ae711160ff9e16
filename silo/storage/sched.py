"""SlateDB's threads under SCHED_BATCH: they no longer preempt the event loop on wake-up.

A worker process is pinned to one core (silo.runtime.supervisor), so its event loop
thread and SlateDB's Tokio threads (the runtime's workers and its blocking pool, which
does the local object store's file calls) take turns on that core. Under the default
policy a thread that is woken preempts the running one at once. Each group commit's
write and WAL flush wake a Tokio worker from inside the loop thread's FFI call, while
that call still holds the lock of the channel it sent on (`async_channel`'s listener
list): the worker preempted the loop, blocked on that lock at once, and the loop ran
again to release it. Per commit, measured with `perf stat` on `bench/commit_cost.py`
(one operation per commit, as the unary API's commits mostly are): 8.6 context
switches and 5.3 futex calls; the loop thread was preempted 1.9 times.

SCHED_BATCH (same CPU share as SCHED_OTHER at the same nice value) differs in one thing
that matters here: a woken batch thread does not preempt a SCHED_OTHER one. The Tokio
worker then runs when the loop thread blocks (in epoll, usually at once: it awaits the
flush) or its time slice ends, finds the write and the flush queued together, and takes
no contended lock: 5.1 context switches and 2.1 futex calls per commit, the loop thread
never preempted. What waits is only SlateDB's share of the core while the loop thread has
work; durability is unchanged (an operation still answers only after its flush).

Threads are found by name in /proc/self/task. A thread inherits its creator's policy:
Tokio's blocking threads are started on demand, from a (batch) worker or possibly from
the loop thread (a call polled there), so `apply` is cheap to repeat and the committer
repeats it every RESCAN_S (silo.storage.db.GroupCommitter).

Opt-in (`storage.slatedb_sched_batch`, env `SILO_SLATEDB_SCHED_BATCH`, flag
`--slatedb-sched-batch`; the worker calls `configure` before its shards open) until a
quiet steady-rate run shows it does not cost latency: a batch thread also does not preempt *other*
processes on its core, so when the worker's core is shared (a load generator, another
server), each of a commit's ~3 SlateDB wake-ups may wait out that process's time slice
where it used to preempt it. Measured so far only on a shared, loaded box (bench/README.md
"What one group commit costs", stop 21), where neither the saving in CPU per job nor a
cost in steady-rate latency stood out of the noise.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Thread names (comm, at most 15 characters) of SlateDB's runtime threads: the bindings'
# Tokio runtime ("slatedb-uniffi-…", workers and blocking pool) and async-compat's
# fallback runtime ("async-compat/tokio").
THREAD_PREFIXES = ("slatedb-uniffi", "async-compat")
# Seconds between two scans by the committer (a scan of ~20 threads: well under 1 ms).
RESCAN_S = 5.0


_state = {"on": False}


def configure(on: bool) -> None:
    """This process's setting (storage.slatedb_sched_batch)."""
    _state["on"] = on


def enabled() -> bool:
    """Configured on, and the OS has SCHED_BATCH."""
    return (_state["on"] and hasattr(os, "SCHED_BATCH")
            and os.path.isdir("/proc/self/task"))


def _comm(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:  # the thread ended meanwhile
        return ""


def apply() -> int:
    """Put every SlateDB thread of this process under SCHED_BATCH; returns how many were
    changed now (0 when all already were, or when off: then a cheap no-op)."""
    if not enabled():
        return 0
    changed = 0
    for tid in os.listdir("/proc/self/task"):
        if not _comm(tid).startswith(THREAD_PREFIXES):
            continue
        try:
            n = int(tid)
            if os.sched_getscheduler(n) != os.SCHED_BATCH:
                os.sched_setscheduler(n, os.SCHED_BATCH, os.sched_param(0))
                changed += 1
        except OSError as e:  # gone, or not permitted (a sandbox): the default stays
            log.debug("SCHED_BATCH for thread %s: %s", tid, e)
    return changed
