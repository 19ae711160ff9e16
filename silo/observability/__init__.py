"""Observability: every metric, span and operational log event of the server.

* `metrics`: the Prometheus instruments (declared once, with names, labels and help),
  the per-process accumulators the hot path increments, and `GET /metrics`.
* `tracing`: OpenTelemetry spans, only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
* `events`: one structured log event per operational fact.
* `profiling` / `pprof`: CPU (py-spy), heap (tracemalloc) and task dumps for the RPCs.

Other modules import instruments from here and never create one.
"""
