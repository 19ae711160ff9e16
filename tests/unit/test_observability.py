"""Pure pieces of silo.observability: accumulators, py-spy parsing, pprof, clamping, events."""

from __future__ import annotations

import logging

from hypothesis import given
from hypothesis import strategies as st

from silo.observability import events, metrics, pprof, profiling


class _Value:
    def __init__(self) -> None:
        self.v = 0.0

    def inc(self, n: float) -> None:
        self.v += n


class _Child:
    def __init__(self, buckets: int) -> None:
        self._buckets = [_Value() for _ in range(buckets)]
        self._sum = _Value()
        self.total = 0.0

    def inc(self, n: float) -> None:
        self.total += n


class _Prom:
    def __init__(self, buckets: int = 0) -> None:
        self.children: dict[tuple, _Child] = {}
        self.buckets = buckets

    def labels(self, *labels):
        return self.children.setdefault(labels, _Child(self.buckets))


def test_counter_accumulates_until_flushed_then_adds_once():
    c = metrics.Counter("t_total", "t", ("shard",))
    metrics._ALL.remove(c)
    c.prom = _Prom()
    for _ in range(5):
        c.inc(("a",))
    c.inc(("b",), 3)
    c.flush()
    c.flush()  # nothing new: adds nothing
    assert c.prom.children[("a",)].total == 5
    assert c.prom.children[("b",)].total == 3


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
def test_histogram_flush_matches_per_observation_buckets(values):
    buckets = (0.5, 1.0, 10.0)
    h = metrics.Histogram("t_h", "t", ("x",), buckets=buckets)
    metrics._ALL.remove(h)
    h.prom = _Prom(len(buckets) + 1)
    for v in values:
        h.observe(("x",), v)
    h.flush()
    if not values:
        assert h.prom.children == {}
        return
    child = h.prom.children[("x",)]
    expected = [0] * (len(buckets) + 1)
    for v in values:  # prometheus-client: the first bucket whose bound >= v
        expected[next((i for i, b in enumerate(buckets) if v <= b), len(buckets))] += 1
    assert [b.v for b in child._buckets] == expected
    assert abs(child._sum.v - sum(values)) < 1e-6


def test_parse_py_spy_raw_output():
    text = ("<module> (silo/__main__.py:5);serve (silo/runtime/worker.py:88) 7\n"
            "idle 3\n"
            "garbage line\n")
    assert profiling.parse_raw(text) == [
        ([("<module>", "silo/__main__.py", 5), ("serve", "silo/runtime/worker.py", 88)], 7),
        ([("idle", "", 0)], 3),
    ]


def test_pprof_round_trip_puts_the_leaf_first():
    data = pprof.build([([("main", "a.py", 1), ("leaf", "b.py", 9)], [2, 20], {"worker": "w0"})],
                       [("samples", "count"), ("cpu", "nanoseconds")],
                       period_type=("cpu", "nanoseconds"), period=10)
    p = pprof.parse(data)
    names = {f.id: p.string_table[f.name] for f in p.function}
    locs = {loc.id: loc for loc in p.location}
    [sample] = p.sample
    assert [names[locs[i].line[0].function_id] for i in sample.location_id] == ["leaf", "main"]
    assert list(sample.value) == [2, 20]
    assert p.string_table[0] == ""
    assert p.string_table[sample.label[0].str] == "w0"


def test_clamp_follows_the_rpc_rules():
    assert profiling.clamp(0, 30, 1, 300) == 30
    assert profiling.clamp(999, 30, 1, 300) == 300
    assert profiling.clamp(5, 30, 1, 300) == 5


def test_events_are_key_value_text_with_structured_fields(caplog):
    with caplog.at_level(logging.INFO, logger="silo.events"):
        events.emit("shard_opened", shard="s1", duration_ms=3.5, note="two words")
    [rec] = caplog.records
    assert rec.getMessage() == 'event=shard_opened shard=s1 duration_ms=3.5 note="two words"'
    assert rec.silo_fields == {"event": "shard_opened", "shard": "s1", "duration_ms": 3.5,
                               "note": "two words"}


def test_dump_tasks_lists_threads_without_a_loop():
    text, n = profiling.dump_tasks("w9")
    assert n == 0 and "=== w9" in text and "MainThread" in text


def test_json_logs_carry_the_event_fields_at_top_level():
    import orjson

    from silo.runtime.server import _JsonFormatter

    rec = logging.LogRecord("silo.events", logging.INFO, __file__, 1, "%s", ("event=x",), None)
    rec.silo_fields = {"event": "worker_restarted", "worker": 1, "cause": "killed"}
    doc = orjson.loads(_JsonFormatter(worker=None).format(rec))
    assert doc["event"] == "worker_restarted" and doc["worker"] == 1 and doc["cause"] == "killed"
