"""The job list's shape, recognised in a jobs scan: newest first, a page at a time.

The web UI's job list (silo.web.joblist) asks for `ORDER BY <time> DESC, id DESC,
shard_id DESC LIMIT n` with equality filters (tenant, status, task group, one metadata
key = value) and, past page 1, a keyset cursor `(<time>, id, shard_id) < (ts, id,
shard)`. <time> is enqueue_time_ms, which the enqueue-time indexes (0x10/0x11,
keys.py) hold in that order; with a status filter it is the status index's own time
(0x03: the status change, or the next attempt's start for Waiting/Scheduled), which
that index holds in that order. Either way a page reads about n index rows and n job
rows per shard (timeorder_read.py) instead of every matching job.

Pure and import-free of plan.py (which calls `recognise` from `narrow`), so the
planner's conjunct walk can hand over what it does not know itself: a task-group
equality on jobs and the keyset predicate. Both still count as `other_filters` for the
older read paths, which then read their ranges in full, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

ENQUEUE = "enqueue_time_ms"
CHANGED = "status_changed_at_ms"
NEXT_START = "next_attempt_starts_after_ms"
ORDER_COLUMNS = (ENQUEUE, CHANGED, NEXT_START)


def status_order(word: str) -> str:
    """The column the status index orders one status word's rows by (newest first)."""
    return NEXT_START if word in ("Waiting", "Scheduled") else CHANGED


@dataclass(frozen=True)
class Keyset:
    """Rows strictly after (older=True) or before (False) this sort key, newest first."""

    column: str
    ms: int
    job_id: str
    shard_id: str
    older: bool

    def admits(self, ms: int, job_id: str, shard_id: str) -> bool:
        row, at = (ms, job_id, shard_id), (self.ms, self.job_id, self.shard_id)
        return row < at if self.older else row > at


def _column(e) -> str | None:
    while e.variant_name() in ("Cast", "TryCast"):
        e = e.rex_call_operands()[0]
    return e.to_variant().name() if e.variant_name() == "Column" else None


def _literal(e):
    if e.variant_name() != "Literal":
        return None
    v = e.python_value()
    return v.as_py() if hasattr(v, "as_py") else v


def _compare(e) -> tuple[str, str, object] | None:
    """(column, op, literal) of `col op literal`."""
    if e.variant_name() != "BinaryExpr":
        return None
    v = e.to_variant()
    col, lit = _column(v.left()), _literal(v.right())
    if col is None or lit is None:
        return None
    return col, v.op(), lit


def _split(e, op: str) -> list:
    if e.variant_name() == "BinaryExpr" and e.to_variant().op() == op:
        v = e.to_variant()
        return _split(v.left(), op) + _split(v.right(), op)
    return [e]


def _pair(e, col: str, op: str) -> tuple[object, list] | None:
    """`col op L OR (col = L AND rest)` → (L, rest terms); the OR nests to the right."""
    terms = _split(e, "OR")
    if len(terms) < 2:
        return None
    first = _compare(terms[0])
    if first is None or first[:2] != (col, op):
        return None
    rest = terms[1:]
    tie = _split(rest[0], "AND") if len(rest) == 1 else None
    if not tie or len(tie) != 2:
        return None
    eq = _compare(tie[0])
    if eq != (col, "=", first[2]):
        return None
    return first[2], [tie[1]]


def keyset(e) -> Keyset | None:
    """The cursor predicate joblist.build writes, or None."""
    for col, op in ((c, o) for c in ORDER_COLUMNS for o in ("<", ">")):
        outer = _pair(e, col, op)
        if outer is None:
            continue
        ms, (inner,) = outer
        mid = _pair(inner, "id", op)
        if mid is None:
            return None
        job_id, (last,) = mid
        c = _compare(last)
        if c is None or c[:2] != ("shard_id", op):
            return None
        if not (isinstance(ms, int) and not isinstance(ms, bool)
                and isinstance(job_id, str) and isinstance(c[2], str)):
            return None
        return Keyset(col, ms, job_id, c[2], older=op == "<")
    return None


def recognise(scan, conjunct, eq: tuple[str, set[str]] | None) -> bool:
    """Record on a jobs Scan a conjunct only the time-ordered read uses (task-group
    equality, the keyset cursor); False: not one of those."""
    if scan.table != "jobs":
        return False
    if eq is not None and eq[0] == "task_group":
        groups = eq[1]
        scan.job_groups = groups if scan.job_groups is None else scan.job_groups & groups
        return True
    ks = keyset(conjunct)
    if ks is not None and scan.keyset is None:
        scan.keyset = ks
        return True
    return False


def served(scan) -> str | None:
    """Which index serves the scan: "enqueue" (0x10/0x11) or "status" (0x03), or
    None when it is not the job list's shape (a LIMIT over one of those orders, newest
    first or a keyset page, with only filters the time-ordered read checks itself)."""
    if (scan.table != "jobs" or scan.unrecognised or scan.ids is not None
            or scan.meta_prefix is not None or scan.limit is None or not scan.order):
        return None
    col, desc = scan.order[0]
    if col not in ORDER_COLUMNS:
        return None
    ks = scan.keyset
    if (ks is None and not desc) or (ks is not None and (ks.column, ks.older) != (col, desc)):
        return None  # oldest first from the start would read everything anyway
    if col == ENQUEUE:
        return "enqueue"
    if scan.statuses and all(status_order(w) == col for w in scan.statuses):
        return "status"
    return None


def walk_status_cheaper(n: int, matching: int, total: int) -> bool:
    """A status filter alone: walk the enqueue-time index confirming statuses (about
    n·total/matching index rows and status reads) rather than read every job of the
    status from the status index and sort (about 3·matching reads)?"""
    if matching <= 0:
        return False
    return 2 * n * total / matching < 3 * matching
