"""The web UI's pure parts for lists and charts: the job list's SQL and keyset pages,
the rate rings, the heap walk, the SVG chart, the proxy-aware origin check."""

from __future__ import annotations

import asyncio
import random
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from silo.observability import rates
from silo.shard.state import Shard, ShardConfig
from silo.web import joblist, security, stats
from silo.web.chart import line_chart
from silo.web.pages_queues import queue_rows
from silo.web.pages_tenant import tenant_rows
from silo.web.stats import NodeFigures
from tests.unit.test_shard import T0, Clock, add


def test_filters_become_parameters_never_sql_text():
    evil = "x' OR 1=1 --"
    f = joblist.Filters(status="Failed", task_group=evil, tenant=evil, meta_key=evil,
                        meta_value=evil, job_id=evil)
    sql, params = joblist.build(f, joblist.Cursor(5, evil, evil), 51)
    assert evil not in sql and "'" not in sql
    assert params.count(evil) == 7 and "Failed" in params and 5 in params
    assert sql.endswith("ORDER BY status_changed_at_ms DESC, id DESC, shard_id DESC LIMIT 51")
    prefix, _ = joblist.build(joblist.Filters(meta_key="k", meta_value="v", meta_prefix=True),
                              None, 10)
    assert "starts_with(array_any_value(element_at(metadata, $1)), $2)" in prefix


def test_status_words_and_cursors():
    assert joblist.parse_status("canceled") == "Cancelled"
    assert joblist.parse_status("") == ""
    for bad in ("bogus", "'; drop"):
        try:
            joblist.parse_status(bad)
        except joblist.BadFilter:
            continue
        raise AssertionError(bad)
    c = joblist.Cursor(123, "id~with~tildes", "shard", older=True)
    assert joblist.Cursor.decode(c.encode(), older=True) == c
    for bad in ("", "x~y~z", "1~s~", "1"):
        try:
            joblist.Cursor.decode(bad, older=True)
        except joblist.BadFilter:
            continue
        raise AssertionError(bad)


def _sort_key(r):
    return (r["enqueue_time_ms"], r["id"], r["shard_id"])


def _run(rows, f_cursor, limit):
    """What the engine returns for build(): the ordered rows beyond the cursor."""
    if f_cursor is None:
        out = sorted(rows, key=_sort_key, reverse=True)
    else:
        k = (f_cursor.enqueue_ms, f_cursor.job_id, f_cursor.shard_id)
        if f_cursor.older:
            out = sorted((r for r in rows if _sort_key(r) < k), key=_sort_key, reverse=True)
        else:
            out = sorted((r for r in rows if _sort_key(r) > k), key=_sort_key)
    return out[:limit]


@settings(deadline=None)  # a loaded shared box must not fail a pure test on time
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 1)),
                unique=True, max_size=40), st.integers(1, 7))
def test_keyset_pages_cover_every_row_once_both_ways(keys_, per_page):
    rows = [{"enqueue_time_ms": t, "id": f"j{i}", "shard_id": f"s{s}"} for t, i, s in keys_]
    newest_first = sorted(rows, key=_sort_key, reverse=True)
    seen, cursor, pages = [], None, []
    while True:
        page, older, newer = joblist.page_of(_run(rows, cursor, per_page + 1), cursor,
                                             per_page)
        pages.append((cursor, page))
        seen += page
        assert (newer is None) == (cursor is None)
        if older is None:
            break
        cursor = older
    assert seen == newest_first
    # walking back with "newer" from the last page gives the same pages
    back = cursor
    for prev_cursor, prev_page in reversed(pages[:-1]):
        last_page = [p for c, p in pages if c == back][0]
        _, _, newer = joblist.page_of(_run(rows, back, per_page + 1), back, per_page)
        assert newer is not None and last_page
        page, _, _ = joblist.page_of(_run(rows, newer, per_page + 1), newer, per_page)
        assert page == prev_page
        back = prev_cursor


def test_rate_rings_are_bounded_and_merge():
    now = [1_000_000.0]
    r = rates.Rates(clock=lambda: now[0])
    r.add("g", rates.ENQUEUED, 5)
    now[0] += 10
    r.add("g", rates.COMPLETED, 2)
    now[0] += rates.BUCKETS * rates.BUCKET_S  # a full lap later: old buckets are gone
    r.add("g", rates.ENQUEUED)
    snap = r.snapshot()
    assert [row[1:] for row in snap["groups"]["g"]] == [[1, 0]]
    for i in range(rates.MAX_GROUPS + 50):
        r.add(f"g{i}", rates.ENQUEUED)
    assert len(r.groups) <= rates.MAX_GROUPS + 1 and rates.OTHER in r.groups
    now_b, merged = rates.merge([snap, snap])
    assert now_b == snap["now"] and merged["g"][0][-1] == 2 and len(merged["g"][1]) == 90


def test_node_figures_add_processes_and_split_due_from_future():
    part = {"rates": {"now": 5, "groups": {"a": [[5, 3, 1]]}},
            "groups": {"a": [10, 2, 2, 0], "b": [1, 0, 1, 1]}}
    f = NodeFigures([part, part], ["w1"])
    assert f.groups["a"] == {"pending": 20, "running": 4, "scheduled": 4, "due": 16,
                             "capped": 0}
    assert f.groups["b"]["capped"] == 1
    assert f.groups["b"]["scheduled"] == 2 and f.groups["b"]["due"] == 0
    assert f.per_second("a")[0][-1] == 0.6
    assert f.missing == ["w1"]


def test_future_tasks_count_only_the_rows_after_now():
    async def main():
        clock = Clock()
        s = await Shard.open(str(uuid.uuid4()), "", "", "memory:///",
                             ShardConfig(commit_interval_ms=0, flush_interval_ms=1), clock)
        try:
            for i in range(5):
                await add(s, f"due-{i}", group="fg")
            for i in range(3):
                await add(s, f"later-{i}", group="fg", start_at_ms=T0 + 60_000 + i)
            await add(s, "other", group="fh", start_at_ms=T0 + 60_000)
            assert await stats.future_tasks(s, "fg", clock.t) == 3
            assert await stats.future_tasks(s, "fg", clock.t, cap=2) == 3  # more than 2
            assert await stats.future_tasks(s, "fg", clock.t, cap=3) == 3
            assert await stats.future_tasks(s, "fh", clock.t + 60_000) == 0
        finally:
            await s.close()
    asyncio.run(main())


def test_chart_is_escaped_svg_without_remote_assets():
    svg = str(line_chart([("<b>a</b>", [0.0, 1.5, 3.0]), ("c", [random.random()] * 3)],
                         seconds_per_point=10, title="t<script>"))
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert "<script>" not in svg and "<b>" not in svg and "&lt;b&gt;" in svg
    assert "href" not in svg and "−20 s" in svg and "now" in svg
    assert "<polyline" not in str(line_chart([("x", [])], seconds_per_point=10, title="e"))


def test_same_origin_behind_a_proxy():
    public = "https://silo.example.com"
    assert security.same_origin(public, "10.0.0.5:8080", public_origin=public)
    assert security.same_origin(public + "/", "10.0.0.5:8080", public_origin=public)
    assert not security.same_origin("https://evil.example", "10.0.0.5:8080",
                                    public_origin=public)
    # X-Forwarded-* only count when the caller passes them (webui.trust_forwarded)
    assert not security.same_origin("https://p.example", "10.0.0.5:8080")
    assert security.same_origin("https://p.example", "10.0.0.5:8080",
                                forwarded_host="p.example, other", forwarded_proto="https")
    assert not security.same_origin("http://p.example", "10.0.0.5:8080",
                                    forwarded_host="p.example", forwarded_proto="https")
    assert security.same_origin("http://H:1", "h:1")


def test_queue_and_tenant_rows():
    rows = queue_rows([
        {"tenant": "-", "queue_name": "a", "entry_type": "holder", "n": 1},
        {"tenant": "-", "queue_name": "a", "entry_type": "requester", "n": 4},
        {"tenant": "-", "queue_name": "b", "entry_type": "holder", "n": 3},
    ], {("-", "a"): (1, "Fixed"), ("-", "c"): (5, "Floating")})
    assert [(r["name"], r["holders"], r["waiters"], r["total"]) for r in rows] == [
        ("b", 3, 0, 3), ("a", 1, 4, 5), ("c", 0, 0, 0)]
    assert rows[1]["max"] == 1 and rows[2]["kind"] == "Floating"
    t = tenant_rows([{"tenant": "x", "status_kind": "Running", "n": 2},
                     {"tenant": "x", "status_kind": "Succeeded", "n": 3},
                     {"tenant": "a", "status_kind": "Scheduled", "n": 1}])
    assert [(r["name"], r["total"], r["Running"]) for r in t] == [("a", 1, 0), ("x", 5, 2)]
