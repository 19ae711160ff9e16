"""The job list's query: filters and keyset pagination → one parameterised statement.

Pure: `build` turns validated filters and a cursor into SQL text with `$n`
placeholders and the parameter list, so user text never becomes SQL text. The
predicates are the forms the engine narrows by (silo.query.plan): id equality (point
reads), metadata exact / prefix (0x04 index), status (0x03 index), tenant equality.

Order: newest first by (time, id, shard_id), a total order over the node. The time is
enqueue_time_ms, or with a status filter the time the status index orders that status
by (`order_column`: when the job entered it, or for Waiting/Scheduled when its next
attempt starts), so that either way an index holds the page's order and a page reads
about a page of rows (silo.query.timeorder). A page's cursor is the sort key of its
last row ("older") or first row ("newer"); the next page asks for rows strictly beyond
it, so a deep page costs what page 1 costs and jobs arriving meanwhile never shift a
page (no OFFSET).
"""

from __future__ import annotations

from dataclasses import dataclass

from silo.query.schema import canonical_status
from silo.query.timeorder import ENQUEUE, status_order

COLUMNS = ("shard_id", "tenant", "id", "status_kind", "task_group", "priority",
           "enqueue_time_ms", "status_changed_at_ms", "current_attempt",
           "next_attempt_starts_after_ms")
ORDER_LABEL = {"enqueue_time_ms": "enqueue time",
               "status_changed_at_ms": "time of entering the status",
               "next_attempt_starts_after_ms": "next attempt start"}
STATUSES = ("Waiting", "Scheduled", "Running", "Succeeded", "Failed", "Cancelled")
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 500


class BadFilter(ValueError):
    """A filter or cursor the list cannot use (shown as a 400 page)."""


@dataclass(frozen=True)
class Filters:
    status: str = ""  # canonical word or ""
    task_group: str | None = None  # None: any ("" is the default group)
    tenant: str | None = None
    meta_key: str = ""
    meta_value: str = ""
    meta_prefix: bool = False
    job_id: str = ""


@dataclass(frozen=True)
class Cursor:
    """A row's sort key and the direction to read from it."""

    enqueue_ms: int  # the time of the list's order column (order_column)
    job_id: str
    shard_id: str
    older: bool = True  # rows after it (older); False: rows before it (newer)

    def encode(self) -> str:
        return f"{self.enqueue_ms}~{self.shard_id}~{self.job_id}"

    @classmethod
    def decode(cls, text: str, *, older: bool) -> Cursor:
        ms, sep, rest = text.partition("~")
        shard, sep2, job_id = rest.partition("~")
        if not (sep and sep2) or not ms.lstrip("-").isdigit() or not job_id:
            raise BadFilter(f"invalid page cursor: {text!r}")
        return cls(int(ms), job_id, shard, older)


def parse_status(word: str) -> str:
    if not word:
        return ""
    canonical = canonical_status(word)
    if canonical is None:
        raise BadFilter(f"unknown status {word!r}; one of {', '.join(STATUSES)}")
    return canonical


def order_column(f: Filters) -> str:
    """The time a list is ordered by (newest first): see the module docstring."""
    return status_order(f.status) if f.status else ENQUEUE


def build(f: Filters, cursor: Cursor | None, limit: int) -> tuple[str, list]:
    """(sql, params) for one page of `limit` rows (ask for one more to know if there
    are more)."""
    where: list[str] = []
    params: list = []

    def p(value) -> str:
        params.append(value)
        return f"${len(params)}"

    if f.job_id:
        where.append(f"id = {p(f.job_id)}")
    if f.tenant is not None:
        where.append(f"tenant = {p(f.tenant)}")
    if f.status:
        where.append(f"status_kind = {p(f.status)}")
    if f.task_group is not None:
        where.append(f"task_group = {p(f.task_group)}")
    if f.meta_key:
        if f.meta_prefix:
            where.append(f"starts_with(array_any_value(element_at(metadata, {p(f.meta_key)})), "
                         f"{p(f.meta_value)})")
        else:
            where.append(f"array_has(element_at(metadata, {p(f.meta_key)}), "
                         f"{p(f.meta_value)})")
    col = order_column(f)
    if cursor is not None:
        op = "<" if cursor.older else ">"
        ms, jid, sid = p(cursor.enqueue_ms), p(cursor.job_id), p(cursor.shard_id)
        where.append(f"({col} {op} {ms} OR ({col} = {ms} AND "
                     f"(id {op} {jid} OR (id = {jid} AND shard_id {op} {sid}))))")
    direction = "DESC" if cursor is None or cursor.older else "ASC"
    sql = (f"SELECT {', '.join(COLUMNS)} FROM jobs"
           + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY {col} {direction}, id {direction}, shard_id {direction}"
           + f" LIMIT {int(limit)}")
    return sql, params


def page_of(rows: list[dict], cursor: Cursor | None, per_page: int, col: str = ENQUEUE
            ) -> tuple[list[dict], Cursor | None, Cursor | None]:
    """(rows newest first, cursor of the older page or None, of the newer page or None)
    from the per_page + 1 rows a statement of `build` returned (ordered by col)."""
    more = len(rows) > per_page
    rows = rows[:per_page]
    if cursor is not None and not cursor.older:
        rows.reverse()  # read oldest first from the cursor: show newest first
    if not rows:
        return rows, None, None

    def key(r: dict, older: bool) -> Cursor:
        return Cursor(int(r[col] or 0), str(r["id"]), str(r["shard_id"]), older)

    at_newest = cursor is None or (not cursor.older and not more)
    at_oldest = (cursor is None or cursor.older) and not more
    older = None if at_oldest else key(rows[-1], True)
    newer = None if at_newest else key(rows[0], False)
    return rows, older, newer
