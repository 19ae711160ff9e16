"""What a statement pins down about each table it reads, from DataFusion's plan.

The statement is planned (by DataFusion, against empty tables of the right schema)
and every TableScan is paired with the filters right above it (after DataFusion's
own optimiser pushed them down). From their AND-ed conjuncts we recognise the
predicates the indexes can serve; everything else is left to DataFusion, which
evaluates the full statement over whatever we read, so a recognised predicate only
has to select a superset of the matching rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from silo.query import timeorder
from silo.query.schema import TABLES, canonical_status


@dataclass
class Scan:
    """One read of a table: the columns needed and the narrowing predicates found."""

    table: str
    columns: set[str] | None = None  # None: all
    tenants: set[str] | None = None  # None: any tenant
    ids: set[str] | None = None
    statuses: set[str] | None = None  # canonical words (Waiting, Scheduled, Running, …)
    meta_exact: tuple[str, str] | None = None
    meta_prefix: tuple[str, str] | None = None
    task_groups: set[str] | None = None
    other_filters: bool = False  # conjuncts we did not recognise
    status_literals: set[str] = field(default_factory=set)  # as written, e.g. 'running'
    # At most this many rows (OFFSET included) of the scan reach the result: a LIMIT
    # (or a Sort with a fetch) sits above it with only projections and filters in
    # between. `order` is then the sort it takes the first rows of, as (column,
    # descending) pairs; None: any rows will do. scan.py decides whether an index
    # read can honour it (every filter recognised, the index order matching).
    limit: int | None = None
    order: list[tuple[str, bool]] | None = None
    # The job list's shape (timeorder.py): task-group equality on jobs and the keyset
    # cursor; both also set other_filters. unrecognised: a conjunct nobody knows.
    job_groups: set[str] | None = None
    keyset: timeorder.Keyset | None = None
    unrecognised: bool = False
    # Read as one row per status counter with its count (counted.py): the statement
    # was rewritten to sum the counts instead of counting rows.
    weighted: bool = False


def _is_call(e, name: str) -> bool:
    return e.variant_name() == "ScalarFunction" and e.rex_call_operator() == name


def _column(e) -> str | None:
    while e.variant_name() in ("Cast", "TryCast", "Alias"):
        e = e.rex_call_operands()[0] if e.variant_name() != "Alias" else e.to_variant().expr()
    if e.variant_name() == "Column":
        return e.to_variant().name()
    return None


def _string(e) -> str | None:
    if e.variant_name() == "Literal":
        v = e.python_value()
        if isinstance(v, str):
            return v
        pv = getattr(v, "as_py", None)
        if pv is not None and isinstance(pv(), str):
            return pv()
    return None


def _split(e, op: str) -> list:
    if e.variant_name() == "BinaryExpr":
        v = e.to_variant()
        if v.op() == op:
            return _split(v.left(), op) + _split(v.right(), op)
    return [e]


def _eq_values(e) -> tuple[str, set[str]] | None:
    """`col = 'v'`, `'v' = col`, `col IN ('a', 'b')` and OR lists of those on one column."""
    terms = _split(e, "OR")
    col: str | None = None
    values: set[str] = set()
    for t in terms:
        kind = t.variant_name()
        if kind == "BinaryExpr" and t.to_variant().op() == "=":
            v = t.to_variant()
            c, s = _column(v.left()), _string(v.right())
            if c is None:
                c, s = _column(v.right()), _string(v.left())
            if c is None or s is None:
                return None
            found = {s}
        elif kind == "InList" and not t.to_variant().negated():
            v = t.to_variant()
            c = _column(v.expr())
            found = {_string(x) for x in v.list()}
            if c is None or None in found:
                return None
        else:
            return None
        if col is not None and c != col:
            return None
        col = c
        values |= found  # type: ignore[arg-type]
    return (col, values) if col is not None else None


def _metadata_key(e) -> str | None:
    """`element_at(metadata, 'k')` / `metadata['k']` (DataFusion: map_extract)."""
    if _is_call(e, "map_extract"):
        args = e.rex_call_operands()
        if _column(args[0]) == "metadata":
            return _string(args[1])
    return None


def _metadata_value_expr(e) -> str | None:
    """The key of an expression that yields one value of a metadata key:
    `array_any_value(element_at(metadata,'k'))` or `element_at(metadata,'k')[1]`."""
    if _is_call(e, "array_any_value") or _is_call(e, "array_element"):
        args = e.rex_call_operands()
        if _is_call(e, "array_element"):
            idx = args[1]
            if idx.variant_name() != "Literal" or _py(idx) != 1:
                return None
        return _metadata_key(args[0])
    return None


def _py(e):
    v = e.python_value()
    return v.as_py() if hasattr(v, "as_py") else v


def _like_prefix(pattern: str) -> str | None:
    """The literal prefix of a LIKE pattern that is `prefix%` (no other wildcards)."""
    if not pattern.endswith("%"):
        return None
    head = pattern[:-1]
    if "%" in head or "_" in head or "\\" in head:
        return None
    return head


def _metadata(e) -> tuple[str, str, str] | None:
    """('exact'|'prefix', key, value) for the metadata predicates of §7."""
    if _is_call(e, "array_has"):
        args = e.rex_call_operands()
        k, v = _metadata_key(args[0]), _string(args[1])
        if k is not None and v is not None:
            return "exact", k, v
    if _is_call(e, "starts_with"):
        args = e.rex_call_operands()
        k, p = _metadata_value_expr(args[0]), _string(args[1])
        if k is not None and p is not None:
            return "prefix", k, p
    if e.variant_name() == "Like":
        v = e.to_variant()
        if not v.negated() and v.escape_char() is None:
            k = _metadata_value_expr(v.expr())
            p = _string(v.pattern())
            head = _like_prefix(p) if p is not None else None
            if k is not None and head is not None:
                return "prefix", k, head
    if e.variant_name() == "BinaryExpr" and e.to_variant().op() == "=":
        v = e.to_variant()
        k, s = _metadata_value_expr(v.left()), _string(v.right())
        if k is not None and s is not None:
            return "exact", k, s
    return None


def narrow(scan: Scan, conjunct) -> None:
    """Record what one AND-ed conjunct of a filter on scan.table pins down."""
    eq = _eq_values(conjunct)
    if eq is not None:
        col, values = eq
        if col == "tenant":
            scan.tenants = values if scan.tenants is None else scan.tenants & values
            return
        if scan.table == "jobs" and col == "id":
            scan.ids = values if scan.ids is None else scan.ids & values
            return
        if scan.table == "jobs" and col == "status_kind":
            words = {canonical_status(v) for v in values}
            scan.status_literals |= values
            if None not in words:
                scan.statuses = words if scan.statuses is None else scan.statuses & words
                return
        if scan.table == "tasks" and col == "task_group":
            scan.task_groups = (values if scan.task_groups is None
                                else scan.task_groups & values)
            return
    if scan.table == "jobs":
        m = _metadata(conjunct)
        if m is not None:
            kind, k, v = m
            if kind == "exact":
                scan.meta_exact = (k, v)
            else:
                scan.meta_prefix = (k, v)
            return
    if not timeorder.recognise(scan, conjunct, eq):
        scan.unrecognised = True
    scan.other_filters = True


def _fetch(e) -> int | None:
    """The integer of a Limit's fetch/skip expression (None: absent or not a literal)."""
    if e is None:
        return None
    if isinstance(e, int):
        return e
    if e.variant_name() != "Literal":
        return None
    v = _py(e)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _sort_order(v) -> list[tuple[str, bool]] | None:
    out = []
    for se in v.sort_exprs():
        col = _column(se.expr())
        if col is None:
            return None
        out.append((col, not se.ascending()))
    return out


_PASS_THROUGH = ("Projection", "SubqueryAlias")  # row count and order unchanged


def _plain_columns(projection, order: list[tuple[str, bool]]) -> bool:
    """Every sort column passes the projection as itself (not an alias of something)."""
    plain: set[str] = set()
    renamed: set[str] = set()
    for e in projection.projections():
        if e.variant_name() == "Column":
            plain.add(e.to_variant().name())
        else:
            renamed.add(e.schema_name())
    return all(c in plain and c not in renamed for c, _ in order)


def scans_of(plan) -> list[Scan]:
    """Every TableScan of a (optimised) logical plan with its narrowing predicates and
    the row limit (with its order) that reaches it unchanged."""
    out: list[Scan] = []
    Limit = tuple[int, list[tuple[str, bool]] | None] | None

    def visit(node, filters: list, limit: Limit) -> None:
        v = node.to_variant()
        kind = type(v).__name__
        if kind == "Filter":
            visit(node.inputs()[0], filters + _split(v.predicate(), "AND"), limit)
            return
        if kind in _PASS_THROUGH and not filters:
            # A filter above a projection may name an alias: never pushed through.
            if kind == "Projection" and limit is not None and limit[1] is not None:
                limit = limit if _plain_columns(v, limit[1]) else None
            visit(node.inputs()[0], [], limit)
            return
        if kind == "Limit" and not filters:
            fetch, skip = _fetch(v.fetch()), _fetch(v.skip()) or 0
            n = None if fetch is None else fetch + skip
            if limit is not None and n is not None:
                n = min(n, limit[0]) if limit[1] is None else n
            visit(node.inputs()[0], filters, (n, None) if n is not None else None)
            return
        if kind == "Sort" and not filters:
            order = _sort_order(v)
            fetch = v.get_fetch_val()
            n = fetch if isinstance(fetch, int) else None
            if limit is not None and (n is None or limit[0] < n):
                n = limit[0]
            visit(node.inputs()[0], [], (n, order) if n is not None and order else None)
            return
        if kind == "TableScan":
            name = v.table_name()
            name = name.rsplit(".", 1)[-1]
            if name in TABLES:
                scan = Scan(name)
                proj = v.projection()
                if proj:
                    scan.columns = {c for _, c in proj} if isinstance(proj[0], tuple) else None
                for f in list(v.filters()) + filters:
                    for c in _split(f, "AND"):
                        narrow(scan, c)
                own = _fetch(v.fetch())
                if limit is not None:
                    scan.limit, scan.order = limit
                if own is not None and (scan.limit is None or own < scan.limit):
                    scan.limit, scan.order = own, None if scan.limit is None else scan.order
                out.append(scan)
            return
        for child in node.inputs():
            visit(child, [], None)

    visit(plan, [], None)
    return out


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL = re.compile(r"'((?:[^']|'')*)'")


def tables_named(sql: str) -> set[str]:
    """Table names the SQL text mentions, so a table reached only through a construct
    the plan walk does not see (a subquery expression) is still read in full."""
    return {w.lower() for w in _WORD.findall(_LITERAL.sub("", sql))} & set(TABLES)


def canonicalise_status_literals(sql: str, params: list, literals: set[str]) -> tuple[str, list]:
    """Replace lower-case status synonyms ('running', 'canceled', 'success', …) compared
    with status_kind by the word the column shows, in the SQL text and in parameters.

    Only literals the plan showed compared with status_kind are replaced, everywhere
    they occur (the same word compared with another column is an accepted edge)."""
    fix = {w: canonical_status(w) for w in literals}
    fix = {w: c for w, c in fix.items() if c is not None and c != w}
    if not fix:
        return sql, params

    def sub(m: re.Match) -> str:
        raw = m.group(1).replace("''", "'")
        return f"'{fix[raw]}'" if raw in fix else m.group(0)

    sql = _LITERAL.sub(sub, sql)
    params = [fix.get(p, p) if isinstance(p, str) else p for p in params]
    return sql, params
