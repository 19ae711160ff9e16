#!/usr/bin/env python3
"""Client CPU cost of the Python SDK (silo.client / silo.worker) against raw grpc.aio stubs.

    /tmp/venv/bin/python bench/sdk.py [--duration 8] [--warmup 1] [--backlog 10000]

Starts its own `silo serve` (temp data dir, 127.0.0.1:0, --shards 8, flush 10 ms, no
tenancy) and always stops it. Each case then runs in ONE spawned client process (uvloop),
one case at a time, and measures that process's own CPU (getrusage: utime + stime of all
its threads, gRPC's included) over the measured window:

  enqueue/raw   grpc.aio SiloStub.Enqueue, 64 calls in flight (closed loop)
  enqueue/sdk   SiloClient.enqueue, 64 calls in flight (closed loop)
  drain/raw     a raw worker loop: 2 loops, each LeaseTasks(max 32) then ReportOutcome
                for every leased task at once (<= 64 tasks in flight), 10 ms pause
                after an empty poll
  drain/sdk     silo.worker.Worker(concurrency 64, tasks_per_poll 32,
                poll_interval 0.01), async handler that returns at once

Enqueue cases: `--warmup` s of load, then `--duration` s measured. Drain cases: a backlog of
`--backlog` jobs is pre-filled (by another process, not timed) into a task group of their
own, and the window runs from the start of the drain until the last job is reported.
SDK overhead = SDK - raw, per operation (one Enqueue; one processed job). The server shares
the machine's cores with the client, so the ops/s figures move with where the cores go;
the CPU per operation is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path
from typing import Any

INFLIGHT = 64
LEASE_MAX = 32
POLL_INTERVAL_S = 0.01
RPC_TIMEOUT_S = 30.0
PAYLOAD = {"to": "someone@example.com", "n": 12345, "pad": "x" * 40}
RAW_OPTIONS = [("grpc.max_send_message_length", 128 << 20),
               ("grpc.max_receive_message_length", 128 << 20)]


def _load() -> Any:
    """bench/load.py (server start/stop, machine info), imported without modifying it."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import load

    return load


def cpu_s() -> float:
    """utime + stime of this process (all its threads), in seconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------
# client process
# ---------------------------------------------------------------------------


async def _raw_stub(target: str) -> tuple[Any, Any, str]:
    """A raw channel + stub, and the shard the SDK would route tenant-less jobs to."""
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc
    from silo.client.routing import Topology, hash_tenant

    ch = grpc.aio.insecure_channel(target, options=RAW_OPTIONS)
    await asyncio.wait_for(ch.channel_ready(), 15)
    stub = pb_grpc.SiloStub(ch)
    info = await stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=RPC_TIMEOUT_S)
    shard = Topology.from_cluster_info(info).shard_for_key(hash_tenant(None)).shard_id
    return ch, stub, shard


def _raw_enqueue_fn(stub: Any, shard: str, group: str) -> Any:
    import msgspec

    from silo._proto import silo_pb2 as pb

    enc = msgspec.msgpack.encode

    async def call() -> None:
        req = pb.EnqueueRequest(shard=shard, priority=50, start_at_ms=int(time.time() * 1000),
                                task_group=group)
        req.payload.msgpack = enc(PAYLOAD)
        await stub.Enqueue(req, timeout=RPC_TIMEOUT_S)

    return call


async def closed_loop(call: Any, warmup: float, duration: float) -> dict[str, Any]:
    """INFLIGHT loops calling `call()` back to back; counts calls that return in the window."""
    state = {"stop": False, "counting": False, "ops": 0, "errors": 0}

    async def one() -> None:
        while not state["stop"]:
            try:
                await call()
            except Exception:
                state["errors"] += 1
                await asyncio.sleep(0.05)
                continue
            if state["counting"]:
                state["ops"] += 1

    tasks = [asyncio.ensure_future(one()) for _ in range(INFLIGHT)]
    await asyncio.sleep(warmup)
    state["counting"] = True
    c0, t0 = cpu_s(), time.monotonic()
    await asyncio.sleep(duration)
    c1, t1 = cpu_s(), time.monotonic()
    state["counting"] = False
    state["stop"] = True
    await asyncio.gather(*tasks)
    return {"ops": state["ops"], "wall_s": t1 - t0, "cpu_s": c1 - c0, "errors": state["errors"]}


async def enqueue_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    ch, stub, shard = await _raw_stub(cfg["target"])
    try:
        return await closed_loop(_raw_enqueue_fn(stub, shard, cfg["group"]),
                                 cfg["warmup"], cfg["duration"])
    finally:
        await ch.close()


async def enqueue_sdk(cfg: dict[str, Any]) -> dict[str, Any]:
    from silo.client import SiloClient

    async with SiloClient([cfg["target"]]) as client:
        await client.get_topology()
        group = cfg["group"]
        return await closed_loop(lambda: client.enqueue(PAYLOAD, group),
                                 cfg["warmup"], cfg["duration"])


async def prefill(cfg: dict[str, Any]) -> dict[str, Any]:
    """Enqueue exactly cfg["backlog"] jobs into cfg["group"] (raw stub, INFLIGHT in flight)."""
    ch, stub, shard = await _raw_stub(cfg["target"])
    call = _raw_enqueue_fn(stub, shard, cfg["group"])
    left = cfg["backlog"]
    errors = 0

    async def one() -> None:
        nonlocal left, errors
        while left > 0:
            left -= 1
            try:
                await call()
            except Exception:
                left += 1
                errors += 1
                if errors > 1000:
                    raise
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one() for _ in range(INFLIGHT)))
    finally:
        await ch.close()
    return {"ops": cfg["backlog"], "wall_s": time.monotonic() - t0, "errors": errors}


async def _wait_done(count: Any, n: int, timeout: float) -> bool:
    """Check count() every 10 ms until it reaches n; False on timeout."""
    end = time.monotonic() + timeout
    while count() < n:
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


async def drain_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    import msgspec

    from silo._proto import silo_pb2 as pb

    ch, stub, _ = await _raw_stub(cfg["target"])
    n = cfg["backlog"]
    result = msgspec.msgpack.encode(None)
    st = {"done": 0, "errors": 0, "stop": False}

    async def report(t: Any) -> None:
        req = pb.ReportOutcomeRequest(shard=t.shard, task_id=t.id)
        req.success.msgpack = result
        if t.HasField("tenant_id"):
            req.tenant_id = t.tenant_id
        try:
            await stub.ReportOutcome(req, timeout=RPC_TIMEOUT_S)
        except Exception:
            st["errors"] += 1
            return
        st["done"] += 1

    async def poller(i: int) -> None:
        req = pb.LeaseTasksRequest(worker_id=f"sdk-bench-raw-{i}", max_tasks=LEASE_MAX,
                                   task_group=cfg["group"])
        while not st["stop"]:
            try:
                resp = await stub.LeaseTasks(req, timeout=RPC_TIMEOUT_S)
            except Exception:
                st["errors"] += 1
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            if not resp.tasks:
                await asyncio.sleep(POLL_INTERVAL_S)
                continue
            await asyncio.gather(*(report(t) for t in resp.tasks))

    try:
        c0, t0 = cpu_s(), time.monotonic()
        pollers = [asyncio.ensure_future(poller(i)) for i in range(INFLIGHT // LEASE_MAX)]
        ok = await _wait_done(lambda: st["done"], n, cfg["drain_timeout"])
        c1, t1 = cpu_s(), time.monotonic()
        st["stop"] = True
        await asyncio.gather(*pollers)
    finally:
        await ch.close()
    return {"ops": st["done"], "wall_s": t1 - t0, "cpu_s": c1 - c0, "errors": st["errors"],
            "complete": ok}


async def drain_sdk(cfg: dict[str, Any]) -> dict[str, Any]:
    from silo.client import SiloClient
    from silo.worker import Worker

    async def handler(ctx: Any) -> None:
        return None

    n = cfg["backlog"]
    async with SiloClient([cfg["target"]]) as client:
        await client.get_topology()
        worker = Worker(client, cfg["group"], handler, concurrency=INFLIGHT,
                        tasks_per_poll=LEASE_MAX, poll_interval=POLL_INTERVAL_S)
        c0, t0 = cpu_s(), time.monotonic()
        await worker.start()
        try:
            ok = await _wait_done(lambda: worker.stats.succeeded, n, cfg["drain_timeout"])
            c1, t1 = cpu_s(), time.monotonic()
        finally:
            await worker.stop(timeout=10)
        s = worker.stats
        return {"ops": s.succeeded, "wall_s": t1 - t0, "cpu_s": c1 - c0,
                "errors": s.errors + s.failed + s.lease_lost, "complete": ok}


CASES = {"enqueue/raw": enqueue_raw, "enqueue/sdk": enqueue_sdk, "prefill": prefill,
         "drain/raw": drain_raw, "drain/sdk": drain_sdk}


def child_main(case: str, cfg: dict[str, Any], q: Any) -> None:
    import uvloop

    try:
        res = uvloop.run(CASES[case](cfg))
    except BaseException as e:  # the parent must not hang
        res = {"fatal": f"{type(e).__name__}: {e}"}
    q.put(res)


def run_child(case: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=child_main, args=(case, cfg, q), daemon=True)
    p.start()
    try:
        return q.get(timeout=timeout)
    except Exception:
        return {"fatal": f"no result within {timeout:.0f} s"}
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()


# ---------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------


def per_op(r: dict[str, Any]) -> tuple[float, float]:
    ops = max(1, r["ops"])
    return r["cpu_s"] / ops * 1e6, r["ops"] / r["wall_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0, help="enqueue: measured window, s")
    ap.add_argument("--warmup", type=float, default=1.0, help="enqueue: load before the window, s")
    ap.add_argument("--backlog", type=int, default=10_000, help="drain: jobs pre-filled")
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--flush-interval-ms", type=int, default=10)
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.backlog < 1:
        ap.error("duration > 0, warmup >= 0, backlog >= 1")

    load = _load()
    m = load.machine_info()
    print(f"date     {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"machine  {m['nproc']} cores, {m['cpu_model']}, Python {m['python']}, grpcio "
          f"{m['grpcio']}, silo {m['silo_commit']}{' (dirty)' if m['silo_tree_dirty'] else ''},"
          f" {m['busy_pct_before_start']} % busy before start")
    print(f"command  {' '.join([Path(sys.executable).name, *sys.argv])}")

    sargs = argparse.Namespace(flush_interval_ms=args.flush_interval_ms, shards=args.shards,
                               tenants=0, processes=0, silo_bin=None, server_arg=[],
                               keep_data=False)
    server = load.ServerProc(sargs)
    results: dict[str, dict[str, Any]] = {}
    rc = 0
    try:
        target = server.start()
        print(f"server   pid {server.pid} on {target}: {' '.join(server.cmd)}", flush=True)
        run_id = f"{int(time.time())}"
        base = {"target": target, "warmup": args.warmup, "duration": args.duration,
                "backlog": args.backlog, "drain_timeout": args.drain_timeout}
        enq_timeout = args.warmup + args.duration + 60
        drain_timeout = args.drain_timeout + 60
        for case in ("enqueue/raw", "enqueue/sdk", "drain/raw", "drain/sdk"):
            group = f"sdkbench-{run_id}-{case.replace('/', '-')}"
            cfg = {**base, "group": group}
            if case.startswith("drain"):
                f = run_child("prefill", cfg, drain_timeout)
                if "fatal" in f:
                    results[case] = {"fatal": f"pre-fill: {f['fatal']}"}
                    continue
                print(f"[{case}] pre-filled {f['ops']:,} jobs in {f['wall_s']:.1f} s",
                      file=sys.stderr, flush=True)
            r = run_child(case, cfg, drain_timeout if case.startswith("drain") else enq_timeout)
            results[case] = r
            print(f"[{case}] {r}", file=sys.stderr, flush=True)
    finally:
        code = server.stop()
        if code not in (0, None):
            print(f"server exited with code {code}:\n{server.tail(20)}", file=sys.stderr)
        server.cleanup()

    print()
    print(f"{'case':<34} {'ops':>8} {'ops/s':>8} {'client CPU µs/op':>17} {'errors':>7}")
    rows = [("enqueue/raw", "Enqueue, raw grpc.aio stub"),
            ("enqueue/sdk", "Enqueue, SiloClient.enqueue"),
            ("drain/raw", "job processed, raw lease/report"),
            ("drain/sdk", "job processed, silo.worker.Worker")]
    for case, label in rows:
        r = results.get(case, {"fatal": "not run"})
        if "fatal" in r:
            print(f"{label:<34} FAILED: {r['fatal']}")
            rc = 1
            continue
        us, rate = per_op(r)
        print(f"{label:<34} {r['ops']:>8,} {rate:>8,.0f} {us:>17,.1f} {r['errors']:>7}")
        if r["errors"] or r.get("complete") is False:
            rc = 1
    print()
    for op, raw, sdk in (("Enqueue", "enqueue/raw", "enqueue/sdk"),
                         ("processed job", "drain/raw", "drain/sdk")):
        if any("fatal" in results.get(c, {"fatal": 1}) for c in (raw, sdk)):
            continue
        (u_raw, r_raw), (u_sdk, r_sdk) = per_op(results[raw]), per_op(results[sdk])
        print(f"SDK overhead per {op}: {u_sdk - u_raw:+,.1f} µs client CPU"
              f" ({(u_sdk / u_raw - 1) * 100:+.0f} %), rate {(r_sdk / r_raw - 1) * 100:+.0f} %")
    return rc


if __name__ == "__main__":
    sys.exit(main())
