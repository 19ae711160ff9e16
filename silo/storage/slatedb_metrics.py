"""The metrics recorder each shard's database is built with: SlateDB's own recorder,
kept only for the metrics Silo exports.

SlateDB registers about 165 metrics when a database opens, and with the Python binding
every registration is a call from a SlateDB thread back into Python (the recorder is a
foreign trait object) that then calls into Rust again to make the metric: measured ~50 ms
of CPU per open, ~0.2 s for a worker's four shards, on the way to the first lease, and
worse under load, as each call waits for the GIL. Silo exports a dozen of those metrics
(silo.observability.metrics, SLATEDB_NAMES); the others are registered on one shared
sink per metric type (a native metric, never read), which costs the callback but not the
second call: half the CPU of an open. Updating a metric stays native either way.
"""

from __future__ import annotations

from slatedb.uniffi import (
    Counter,
    DefaultMetricsRecorder,
    Gauge,
    Histogram,
    MetricsRecorder,
    UpDownCounter,
)

from silo.observability.metrics import SLATEDB_NAMES

_sinks: dict[str, object] = {}


def _sink(kind: str) -> object:
    """One native metric per kind that the unexported metrics all update (made in the
    worker, at its first open, like every SlateDB object: nothing native crosses a fork)."""
    if not _sinks:
        r = DefaultMetricsRecorder()
        _sinks.update(counter=r.register_counter("silo.unexported", None, []),
                      gauge=r.register_gauge("silo.unexported", None, []),
                      up_down=r.register_up_down_counter("silo.unexported", None, []),
                      histogram=r.register_histogram("silo.unexported", None, [], [1.0]))
    return _sinks[kind]


class ExportedRecorder(MetricsRecorder):
    """A DefaultMetricsRecorder that registers only the exported metrics (`snapshot`
    lists those); every other metric goes to the shared sink of its kind."""

    def __init__(self, names: frozenset[str] = SLATEDB_NAMES) -> None:
        self.inner = DefaultMetricsRecorder()
        self.names = names

    def register_counter(self, name, description, labels) -> Counter:
        if name in self.names:
            return self.inner.register_counter(name, description, labels)
        return _sink("counter")  # type: ignore[return-value]

    def register_gauge(self, name, description, labels) -> Gauge:
        if name in self.names:
            return self.inner.register_gauge(name, description, labels)
        return _sink("gauge")  # type: ignore[return-value]

    def register_up_down_counter(self, name, description, labels) -> UpDownCounter:
        if name in self.names:
            return self.inner.register_up_down_counter(name, description, labels)
        return _sink("up_down")  # type: ignore[return-value]

    def register_histogram(self, name, description, labels, boundaries) -> Histogram:
        if name in self.names:
            return self.inner.register_histogram(name, description, labels, boundaries)
        return _sink("histogram")  # type: ignore[return-value]

    def snapshot(self) -> list:
        return self.inner.snapshot()
