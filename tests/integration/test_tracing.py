"""OTLP/HTTP traces: with OTEL_EXPORTER_OTLP_ENDPOINT set, spans reach a real receiver
(started here, decoding ExportTraceServiceRequest) with the caller's traceparent as
parent, across the forwarding hop between worker processes."""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver on loopback collecting every exported span."""

    def __init__(self) -> None:
        self.spans: list = []
        self.resources: list = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest.FromString(body)
                with lock:
                    for rs in req.resource_spans:
                        outer.resources.append(rs.resource)
                        for ss in rs.scope_spans:
                            outer.spans.extend(ss.spans)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.path = self.httpd.server_address
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.path[1]}"

    def close(self) -> None:
        self.httpd.shutdown()


def test_spans_reach_the_receiver_with_the_callers_parent(tmp_path):
    rx = Receiver()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    try:
        with Server(tmp_path / "d", "--processes", "2", "--shards", "4", env=env) as srv:
            c = srv.client()
            md = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
            now = int(time.time() * 1000)
            for owner in c.owners:  # some shards are another process's: a forwarding hop
                c.stub.Enqueue(pb.EnqueueRequest(
                    shard=owner.shard_id, task_group="g", start_at_ms=now,
                    payload=pb.SerializedBytes(msgpack=b"\x80")), metadata=md, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                spans = [s for s in rx.spans if s.trace_id.hex() == TRACE_ID]
                names = {s.name for s in spans}
                if {"silo.v1.Silo/Enqueue", "enqueue", "storage.commit", "forward",
                        "forwarded Enqueue"} <= names and sum(
                        s.name == "silo.v1.Silo/Enqueue" for s in spans) >= 4:
                    break
                time.sleep(0.1)
            ours = [s for s in rx.spans if s.trace_id.hex() == TRACE_ID]
            names = {s.name for s in ours}
            assert {"silo.v1.Silo/Enqueue", "enqueue", "storage.commit", "forward",
                    "forwarded Enqueue"} <= names, names
            by_id = {s.span_id: s for s in ours}
            roots = [s for s in ours if s.name == "silo.v1.Silo/Enqueue"]
            assert len(roots) == 4
            assert all(s.parent_span_id.hex() == PARENT_ID for s in roots)
            # the owner's span continues the trace under the forwarding hop
            hop = next(s for s in ours if s.name == "forwarded Enqueue")
            assert by_id[hop.parent_span_id].name == "forward"
            enq = next(s for s in ours if s.name == "enqueue")
            assert enq.parent_span_id in by_id
            services = {a.value.string_value for r in rx.resources for a in r.attributes
                        if a.key == "service.name"}
            assert services == {"silo"}
    finally:
        rx.close()


def test_tracing_off_without_the_endpoint(tmp_path):
    env = {k: "" for k in os.environ if k.startswith("OTEL_")}
    with Server(tmp_path / "d", "--processes", "1", env=env) as srv:
        srv.client().enqueue()
    from silo.observability import tracing

    assert not tracing.ENABLED  # the test process has no endpoint either
