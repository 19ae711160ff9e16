"""CPU cost of a forwarded call vs a local one, on a real multi-process server.

Starts `silo serve --processes 2`, puts one connection on the process that owns a
tenant's shard and one on the other process, and sends the same GetJob calls through
each. The difference in server CPU per call (all processes, from /proc) is what a
forwarding hop costs. Usage: python bench/forwarding.py [--calls 20000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from silo._proto import silo_pb2 as pb  # noqa: E402
from silo._proto import silo_pb2_grpc as pb_grpc  # noqa: E402
from tests.integration.harness import CHANNEL_OPTIONS, Client, Server  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def server_cpu(sup: int) -> float:
    return proc_cpu(sup) + sum(proc_cpu(k) for k in workers(sup))


def workers(sup: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{sup}/task/{sup}/children").read_text().split()]


def counts(sup: int) -> dict[str, int]:
    """Read/write syscalls and context switches of the workers (all their threads): a
    forwarding hop's cost in events, which a loaded box does not change."""
    out = {"syscalls": 0, "ctxsw": 0}
    for pid in workers(sup):
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        out["syscalls"] += int(io["syscr"]) + int(io["syscw"])
        for t in Path(f"/proc/{pid}/task").iterdir():
            st = Path(t, "status").read_text()
            out["ctxsw"] += sum(int(x) for x in re.findall(r"ctxt_switches:\s+(\d+)", st))
    return out


def channel_on(addr: str, worker: int) -> grpc.Channel:
    for i in range(200):
        ch = grpc.insecure_channel(addr, options=CHANNEL_OPTIONS + [
            ("grpc.use_local_subchannel_pool", 1), ("bench.nonce", i)])
        _, call = pb_grpc.SiloStub(ch).GetClusterInfo.with_call(pb.GetClusterInfoRequest())
        if dict(call.trailing_metadata()).get("x-silo-worker") == str(worker):
            return ch
        ch.close()
    raise RuntimeError(f"could not land a connection on worker {worker}")


def run(calls: int, concurrency: int, sup: int, ch: grpc.Channel,
        req) -> tuple[float, float, dict[str, float]]:
    stub = pb_grpc.SiloStub(ch)
    n0 = counts(sup)
    cpu0, t0 = server_cpu(sup), time.perf_counter()
    done = 0
    while done < calls:
        futures = [stub.GetJob.future(req) for _ in range(min(concurrency, calls - done))]
        for f in futures:
            f.result()
        done += len(futures)
    cpu = (server_cpu(sup) - cpu0) / calls * 1e6
    rate = calls / (time.perf_counter() - t0)
    n1 = counts(sup)
    return cpu, rate, {k: (n1[k] - n0[k]) / calls for k in n0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, \
            Server(Path(d) / "data", "--processes", "2", "--tenancy", "--shards", "8") as srv:
        c = Client(srv.channel())
        tenant = "bench-tenant"
        owner_shard = c.shard_for(tenant)
        jid = c.enqueue(tenant=tenant, task_group="fwd")
        req = pb.GetJobRequest(shard=owner_shard, id=jid, tenant=tenant)
        sup = srv.proc.pid
        results = {}
        for w in (0, 1):
            ch = channel_on(srv.addr, w)
            pb_grpc.SiloStub(ch).GetJob(req)  # warm the path (and the peer connection)
            run(2000, args.concurrency, sup, ch, req)
            results[w] = run(args.calls, args.concurrency, sup, ch, req)
            ch.close()
        local_w = 0 if _owner_is(c, owner_shard, 0) else 1
        remote_w = 1 - local_w
        (cl, rl, nl), (cr, rr, nr) = results[local_w], results[remote_w]
        print(f"GetJob via owner process     : {cl:7.1f} µs server CPU/call  {rl:8.0f} calls/s"
              f"  {nl['syscalls']:5.2f} read/write syscalls  {nl['ctxsw']:5.2f} ctx switches/call")
        print(f"GetJob via the other process : {cr:7.1f} µs server CPU/call  {rr:8.0f} calls/s"
              f"  {nr['syscalls']:5.2f} read/write syscalls  {nr['ctxsw']:5.2f} ctx switches/call")
        print(f"forwarding hop adds          : {cr - cl:7.1f} µs server CPU/call"
              f"  {nr['syscalls'] - nl['syscalls']:+5.2f} syscalls"
              f"  {nr['ctxsw'] - nl['ctxsw']:+5.2f} ctx switches per call")
        c.channel.close()
        srv.proc.send_signal(signal.SIGTERM)
    return 0


def _owner_is(c: Client, shard_id: str, worker: int) -> bool:
    # Shard i of the map (sorted by range start) belongs to worker i mod N.
    order = [o.shard_id for o in c.owners]
    return order.index(shard_id) % 2 == worker


if __name__ == "__main__":
    raise SystemExit(main())
