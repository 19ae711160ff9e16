"""bench/limits.py's limited-throughput scenario: jobs with a concurrency limit vs without."""


import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from typing import Any

from common import reap
from limits_harness import (
    CLIENT_START_TIMEOUT_S,
    EMPTY_POLL_SLEEP_S,
    ERROR_SLEEP_S,
    PRIORITY,
    TP_LEASE_BATCH,
    TP_MAX_CONCURRENCY,
    TP_TENANTS,
    CpuSnap,
    Errors,
    Server,
    cpu_between,
    open_stub,
    pcts_ms,
    route,
    spawn,
    topology,
    tree_cpu,
    wait_event,
)

# ---------------------------------------------------------------------------
# limited-throughput: client process
# ---------------------------------------------------------------------------

# shared counters per client process
C_ENQ, C_DONE, C_ERR, C_LEASE = range(4)
N_C = 4


async def tp_client(slot: int, cfg: dict[str, Any], counters: Any, inflight: Any, ready: Any,
                    go: Any, t0: Any) -> dict[str, Any]:
    import msgspec

    from silo._proto import silo_pb2 as pb

    # Several connections per process: the server's worker processes share the listening
    # port, so each connection lands on one of them; with few connections the placement
    # (all on one process or not) moves the figures more than what is measured.
    chans: list[Any] = []
    try:
        for _ in range(cfg["channels"]):
            chans.append(await open_stub(cfg["target"]))
    except Exception as e:
        ready.put((slot, f"{type(e).__name__}: {e}"))
        for ch, _ in chans:
            await ch.close(grace=1)
        raise
    stubs = [stub for _, stub in chans]
    errs = Errors()
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    routes: list[tuple[str, str]] = cfg["routes"]
    tenant_ix = {t: i for i, (_, t) in enumerate(routes)}
    nt = len(routes)
    limits = {t: ([pb.Limit(concurrency=pb.ConcurrencyLimit(key=f"{t}-queue",
                                                           max_concurrency=TP_MAX_CONCURRENCY))]
                  if cfg["limited"] else []) for _, t in routes}
    base = slot * N_C
    ibase = slot * nt
    st: Counter[str] = Counter()
    lat: dict[str, list[float]] = {"enqueue": [], "lease": [], "report": [], "e2e": []}
    peak = [0] * nt  # leased-and-unreported per tenant over all client processes, seen at lease time
    ok_bytes = pb.SerializedBytes(msgpack=enc.encode({"ok": True}))
    try:
        ready.put((slot, None))
        if not await wait_event(go, 120):
            return {"fatal": "no start signal"}
        start = t0.value
        win0, win1 = start + cfg["warmup"], start + cfg["warmup"] + cfg["duration"]
        mono = time.monotonic

        async def enqueuer(n: int) -> None:
            stub = stubs[n % len(stubs)]
            i = 0
            while mono() < win1 and i < cfg["max_ops"]:
                shard, tenant = routes[(slot + n + i) % nt]
                i += 1
                ts = time.time()
                req = pb.EnqueueRequest(shard=shard, tenant=tenant, priority=PRIORITY,
                                        start_at_ms=int(ts * 1000), task_group=cfg["group"],
                                        limits=limits[tenant],
                                        payload=pb.SerializedBytes(msgpack=enc.encode(
                                            {"run": cfg["run"], "ts": ts, "pad": "x" * 40})))
                t = mono()
                try:
                    await stub.Enqueue(req, timeout=cfg["call_timeout"])
                except Exception as e:
                    errs.add("Enqueue", e)
                    counters[base + C_ERR] += 1
                    await asyncio.sleep(ERROR_SLEEP_S)
                    continue
                t1 = mono()
                st["enq"] += 1
                counters[base + C_ENQ] += 1
                if win0 <= t1 < win1:
                    st["enq_win"] += 1
                    lat["enqueue"].append(t1 - t)

        async def report(stub: Any, task: Any) -> None:
            req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id, success=ok_bytes)
            if task.HasField("tenant_id"):
                req.tenant_id = task.tenant_id
            ti = tenant_ix.get(task.tenant_id)
            t = mono()
            try:
                await stub.ReportOutcome(req, timeout=cfg["call_timeout"])
            except Exception as e:
                errs.add("ReportOutcome", e)
                counters[base + C_ERR] += 1
                return
            finally:
                if ti is not None:
                    inflight[ibase + ti] -= 1
            t1 = mono()
            st["done"] += 1
            counters[base + C_DONE] += 1
            if win0 <= t1 < win1:
                st["done_win"] += 1
                lat["report"].append(t1 - t)
                with contextlib.suppress(Exception):
                    doc = dec.decode(task.payload.msgpack)
                    if doc.get("run") == cfg["run"]:
                        lat["e2e"].append(time.time() - doc["ts"])

        async def worker(n: int) -> None:
            stub = stubs[n % len(stubs)]
            req = pb.LeaseTasksRequest(worker_id=f"tp-{cfg['run']}-{slot}-{n}",
                                       max_tasks=TP_LEASE_BATCH, task_group=cfg["group"])
            i = 0
            while mono() < win1 and i < cfg["max_ops"]:
                i += 1
                t = mono()
                try:
                    r = await stub.LeaseTasks(req, timeout=cfg["call_timeout"])
                except Exception as e:
                    errs.add("LeaseTasks", e)
                    counters[base + C_ERR] += 1
                    await asyncio.sleep(ERROR_SLEEP_S)
                    continue
                t1 = mono()
                counters[base + C_LEASE] += 1
                if win0 <= t1 < win1:
                    st["lease_calls_win"] += 1
                    st["leased_win"] += len(r.tasks)
                    lat["lease"].append(t1 - t)
                    if not r.tasks:
                        st["lease_empty_win"] += 1
                if not r.tasks:
                    await asyncio.sleep(EMPTY_POLL_SLEEP_S)
                    continue
                for task in r.tasks:
                    ti = tenant_ix.get(task.tenant_id)
                    if ti is None:
                        st["foreign_tenant_tasks"] += 1
                        continue
                    inflight[ibase + ti] += 1
                for ti in range(nt):  # other processes' slots: torn reads are fine for a peak
                    cur = sum(inflight[s * nt + ti] for s in range(cfg["procs"]))
                    peak[ti] = max(peak[ti], cur)
                await asyncio.gather(*(report(stub, task) for task in r.tasks))

        delay = start - mono()
        if delay > 0:
            await asyncio.sleep(delay)
        coros = [enqueuer(n) for n in range(cfg["enqueuers"])] + [worker(n) for n in range(cfg["workers"])]
        tasks = [asyncio.ensure_future(c) for c in coros]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, win1 - mono()) + cfg["call_timeout"] + 5)
        for p in pending:
            p.cancel()
        if pending:
            st["loops_cancelled_at_hard_limit"] += len(pending)
            await asyncio.wait(pending, timeout=5)
        for tk in tasks:
            if tk.done() and not tk.cancelled() and tk.exception() is not None:
                errs.add("loop", tk.exception())
        return {"stats": dict(st), "lat_s": lat, "peak_inflight": peak, **errs.dump()}
    finally:
        for ch, _ in chans:
            await ch.close(grace=1)


def run_throughput(args: argparse.Namespace, server: Server, target: str, limited: bool,
                   label: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    owners = topology(target)
    routes = [(route(owners, t), t) for t in TP_TENANTS]
    cfg = {
        "target": target, "limited": limited, "routes": routes, "procs": args.procs,
        "group": "bench-tp", "run": f"t{os.getpid():x}{int(time.time() * 1000) % 10**8:x}",
        "enqueuers": max(1, args.concurrency // 2), "workers": args.workers,
        "warmup": args.warmup, "duration": args.duration, "call_timeout": args.call_timeout,
        "max_ops": args.max_ops, "channels": args.channels,
    }
    counters = ctx.RawArray("q", args.procs * N_C)
    inflight = ctx.RawArray("q", args.procs * len(routes))
    ready, results_q = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    t0 = ctx.RawValue("d", 0.0)
    procs: list[Any] = []
    results: list[dict[str, Any]] = []
    progress: list[dict[str, Any]] = []
    try:
        for i in range(args.procs):
            procs.append(spawn(ctx, f"tp-client-{i}", "limits_throughput:tp_client", i, cfg, counters, inflight,
                               ready, go, t0, results_q))
        for _ in procs:
            slot, err = ready.get(timeout=CLIENT_START_TIMEOUT_S)
            if err:
                raise RuntimeError(f"client {slot} failed to start: {err}")
        start = time.monotonic() + 0.2
        t0.value = start
        go.set()
        win0, win1 = start + args.warmup, start + args.warmup + args.duration
        pids = [p.pid for p in procs]
        s0 = s1 = None
        tick = start + 1.0
        last = (start, [0] * N_C, sum(tree_cpu(server.pid).values()))
        while s1 is None:
            nxt = min(t for t in (tick, win0 if s0 is None else None, win1) if t is not None)
            time.sleep(max(0.0, nxt - time.monotonic()))
            now = time.monotonic()
            if s0 is None and now >= win0:
                s0 = CpuSnap(server.pid, pids)
            if now >= win1:
                s1 = CpuSnap(server.pid, pids)
            if now >= tick:
                tot = [sum(counters[s * N_C + k] for s in range(args.procs)) for k in range(N_C)]
                srv = sum(tree_cpu(server.pid).values())
                d = now - last[0]
                rate = [(a - b) / d for a, b in zip(tot, last[1], strict=True)]
                mid = now - d / 2
                phase = "warmup" if mid < win0 else "measure"
                cpu_pct = 100 * (srv - last[2]) / d
                print(f"[{label}] t={now - start:5.1f}s {phase:7s} enq/s={rate[C_ENQ]:6.0f}"
                      f" done/s={rate[C_DONE]:6.0f} lease/s={rate[C_LEASE]:5.0f} errors={tot[C_ERR]}"
                      f" server_cpu={cpu_pct:5.1f}%" + ("" if server.alive() else " SERVER EXITED"),
                      file=sys.stderr, flush=True)
                progress.append({"t": round(now - start, 2), "phase": phase,
                                 "enq_per_s": round(rate[C_ENQ], 1), "done_per_s": round(rate[C_DONE], 1),
                                 "errors_total": tot[C_ERR], "server_cpu_pct": round(cpu_pct, 1)})
                last = (now, tot, srv)
                tick += 1.0
        deadline = time.monotonic() + args.call_timeout + 20
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                results.append(results_q.get(timeout=max(0.1, deadline - time.monotonic())))
            except Exception:
                break
    finally:
        reap(procs)
    assert s0 is not None and s1 is not None
    cpu = cpu_between(s0, s1)
    window = cpu["seconds"]
    st: Counter[str] = Counter()
    lat: dict[str, list[float]] = {"enqueue": [], "lease": [], "report": [], "e2e": []}
    errors: Counter[str] = Counter()
    msgs: Counter[str] = Counter()
    fatal = []
    peak = [0] * len(routes)
    for r in results:
        if "fatal" in r:
            fatal.append(r["fatal"])
            continue
        st.update(r["stats"])
        errors.update(r["errors"])
        msgs.update(r["error_messages"])
        for k in lat:
            lat[k] += r["lat_s"][k]
        peak = [max(a, b) for a, b in zip(peak, r["peak_inflight"], strict=True)]
    done = st["done_win"]
    calls = st["lease_calls_win"]

    def per_job(cpu_s: float) -> float | None:
        return round(cpu_s * 1e6 / done, 1) if done else None

    out = {
        "limited": limited,
        "limit": f"<tenant>-queue max {TP_MAX_CONCURRENCY}" if limited else None,
        "tenants": {t: {"shard": s, "process": server.shard_process().get(s)} for s, t in routes},
        "window_s": window,
        "completed": done,
        "jobs_per_s": round(done / window, 1),
        "enqueue_per_s": round(st["enq_win"] / window, 1),
        "backlog_at_end": st["enq"] - st["done"],
        "lease_calls_per_s": round(calls / window, 1),
        "lease_empty_pct": round(100 * st["lease_empty_win"] / calls, 1) if calls else None,
        "tasks_per_lease": round(st["leased_win"] / calls, 2) if calls else None,
        "peak_inflight_per_tenant": dict(zip(TP_TENANTS, peak, strict=True)),
        "enqueue_latency_ms": pcts_ms(lat["enqueue"]),
        "lease_latency_ms": pcts_ms(lat["lease"]),
        "report_latency_ms": pcts_ms(lat["report"]),
        "e2e_latency_ms": pcts_ms(lat["e2e"]),
        "server_cpu_us_per_job": per_job(cpu["server_cpu_s"]),
        "loadgen_cpu_us_per_job": per_job(cpu["loadgen_cpu_s"]),
        "cpu": cpu,
        "errors": dict(errors), "error_total": sum(errors.values()), "error_messages": dict(msgs),
        "client_fatal": fatal, "clients_missing": len(procs) - len(results),
        "foreign_tenant_tasks": st["foreign_tenant_tasks"],
        "progress": progress,
    }
    if fatal and not done:
        out["fatal"] = "; ".join(fatal)
    return out


