#!/usr/bin/env python3
"""Server capacity on the compatible unary API, driven by h2load (a C HTTP/2 client that
leaves the CPU to the server): Enqueue and GetJob, ours beside bench/noop_server.py in
the same run.

    PYTHONPATH=. .venv/bin/python bench/h2load.py [--requests 20000] [--connections 8]
        [--streams 16] [--tenants 0] [--json F]

h2load comes from Debian's `nghttp2-client`; it is installed with apt-get when missing.
Each request is a fixed, gRPC-framed protobuf body POSTed to /silo.v1.Silo/<Method>;
h2load counts HTTP statuses only, so after each run the script checks the calls really
succeeded (Enqueue: the node's total_jobs grew by the number of requests; GetJob: one
call through grpcio answers OK). Reported per server and method: calls/s, server CPU
per call, placement (CPU of each worker process: SO_REUSEPORT spreads h2load's
connections over them, and a skewed spread is visible here), the machine's other busy
CPU, and ours as a share of the no-op's calls/s.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import CpuWindow, ServerProc, add_server_args, machine_info, shard_for

FINISHED_RE = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
REQUESTS_RE = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                         r"(\d+) failed, (\d+) errored")
TARGET_SHARE = 0.85  # issue 12: ours >= 85 % of the no-op's Enqueue calls/s


def ensure_h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True,
                       stdout=subprocess.DEVNULL)
        path = shutil.which("h2load")
    if path is None:
        raise SystemExit("h2load not found after installing nghttp2-client")
    return path


def grpc_frame(msg: Any) -> bytes:
    body = msg.SerializeToString()
    return b"\x00" + struct.pack(">I", len(body)) + body


def stub(target: str):
    import grpc

    from silo._proto import silo_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(target)
    return ch, pb_grpc.SiloStub(ch)


def requests_for(target: str, tenant: str | None) -> dict[str, Any]:
    """The Enqueue and GetJob request messages (GetJob of one job enqueued now)."""
    from silo._proto import silo_pb2 as pb

    ch, s = stub(target)
    try:
        info = s.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=10)
        owners = sorted((o.shard_id, o.range_start, o.range_end) for o in info.shard_owners)
        shard = shard_for(owners, tenant or "-")
        enq = pb.EnqueueRequest(shard=shard, task_group="h2load", priority=50,
                                payload=pb.SerializedBytes(msgpack=b"\x81\xa1i\x01"))
        if tenant:
            enq.tenant = tenant
        job_id = s.Enqueue(enq, timeout=10).id
        get = pb.GetJobRequest(shard=shard, id=job_id)
        if tenant:
            get.tenant = tenant
        s.GetJob(get, timeout=10)  # the probe: it must answer OK
        return {"Enqueue": enq, "GetJob": get}
    finally:
        ch.close()


def total_jobs(target: str) -> int | None:
    from silo._proto import silo_pb2 as pb

    ch, s = stub(target)
    try:
        info = s.GetNodeInfo(pb.GetNodeInfoRequest(), timeout=10)
        return sum(x.total_jobs for x in info.owned_shards)
    except Exception:  # noqa: BLE001 - the no-op server has no GetNodeInfo
        return None
    finally:
        ch.close()


def run_h2load(h2load: str, target: str, method: str, body: bytes,
               args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(body)
        f.flush()
        cmd = [h2load, "-n", str(args.requests), "-c", str(args.connections),
               "-m", str(args.streams), "-d", f.name,
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               f"http://{target}/silo.v1.Silo/{method}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout
    m = FINISHED_RE.search(out)
    r = REQUESTS_RE.search(out)
    if not m or not r:
        raise RuntimeError(f"cannot parse h2load output:\n{out}")
    secs = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    return {"seconds": secs, "calls_per_s": float(m.group(3)), "done": int(r.group(2)),
            "succeeded": int(r.group(3)), "failed": int(r.group(4)) + int(r.group(5))}


def bench_server(kind: str, args: argparse.Namespace, h2load: str) -> dict[str, Any]:
    server = ServerProc(args, kind)
    target = server.start()
    out: dict[str, Any] = {"server": kind}
    try:
        reqs = requests_for(target, f"tenant-{0}" if args.tenants else None)
        for method in ("Enqueue", "GetJob"):
            before = total_jobs(target) if method == "Enqueue" else None
            cpu = CpuWindow(server.pid, [])
            cpu.start()
            h = run_h2load(h2load, target, method, grpc_frame(reqs[method]), args)
            w = cpu.stop()
            calls = h["succeeded"]
            if method == "Enqueue" and before is not None:
                grown = (total_jobs(target) or 0) - before
                h["checked_ok"] = grown
                calls = min(calls, grown)
            h["server_cpu_us_per_call"] = round(w["server_cpu_s"] / max(calls, 1) * 1e6, 1)
            h["cpu"] = w
            out[method] = h
    finally:
        server.stop()
        server.cleanup()
    return out


def report(rep: dict[str, Any]) -> None:
    ours, noop = rep["silo"], rep["noop"]
    for method in ("Enqueue", "GetJob"):
        print(f"== h2load {method} ({rep['config']}) " + "=" * 20)
        for r in (ours, noop):
            h = r[method]
            c = h["cpu"]
            print(f"  {r['server']:5s} {h['calls_per_s']:9,.0f} calls/s  "
                  f"{h['server_cpu_us_per_call']:7,.1f} µs server CPU/call  "
                  f"by process {' + '.join(f'{x:.2f}' for x in c['server_cores_by_process'])}"
                  f"  other busy CPU {c['other_cpu_cores']:.2f} cores"
                  + (f"  (failed {h['failed']})" if h["failed"] else ""))
        share = ours[method]["calls_per_s"] / max(noop[method]["calls_per_s"], 1e-9)
        note = ""
        if method == "Enqueue":
            note = f"  [target ≥ {TARGET_SHARE:.0%}: {'met' if share >= TARGET_SHARE else 'MISSED'}]"
        print(f"  ours / no-op calls/s  {share:.2f}{note}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams per connection")
    ap.add_argument("--tenants", type=int, default=0, help=">0: tenancy on, tenant-0")
    add_server_args(ap)
    args = ap.parse_args(argv)
    h2load = ensure_h2load()
    rep = {"machine": machine_info(),
           "config": f"{args.requests} calls, {args.connections} connections x "
                     f"{args.streams} streams, tenancy {'on' if args.tenants else 'off'}",
           "silo": bench_server("silo", args, h2load)}
    time.sleep(1.0)
    rep["noop"] = bench_server("noop", args, h2load)
    report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
