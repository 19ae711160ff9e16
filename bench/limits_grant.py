"""bench/limits.py's grant-latency scenario: release of a concurrency slot -> next waiter leased."""


import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

from common import reap
from limits_harness import (
    CLIENT_START_TIMEOUT_S,
    ERROR_SLEEP_S,
    GRANT_KEY,
    GRANT_TENANT,
    GRANT_WAIT_S,
    PRIORITY,
    CpuSnap,
    Errors,
    Server,
    cpu_between,
    open_stub,
    pcts_ms,
    route,
    spawn,
    topology,
    wait_event,
)

# ---------------------------------------------------------------------------
# grant-latency: client processes
# ---------------------------------------------------------------------------


async def grant_enqueuer(cfg: dict[str, Any], granted: Any, stop: Any, ready: Any,
                         go: Any) -> dict[str, Any]:
    """Keep `waiters` jobs parked behind the slot: enqueue one more for each grant."""
    from silo._proto import silo_pb2 as pb

    ch, stub = await open_stub(cfg["target"])
    errs = Errors()
    lat: list[float] = []
    limit = pb.Limit(concurrency=pb.ConcurrencyLimit(key=GRANT_KEY, max_concurrency=1))
    seq = 0

    async def enqueue_one() -> None:
        nonlocal seq
        req = pb.EnqueueRequest(shard=cfg["shard"], tenant=GRANT_TENANT, id=f"{cfg['run']}-{seq:07d}",
                                priority=PRIORITY, start_at_ms=int(time.time() * 1000),
                                payload=pb.SerializedBytes(msgpack=b"\x80"),
                                limits=[limit], task_group=cfg["group"])
        t = time.perf_counter()
        try:
            await stub.Enqueue(req, timeout=cfg["call_timeout"])
        except Exception as e:
            errs.add("Enqueue", e)
            await asyncio.sleep(ERROR_SLEEP_S)
            return  # the same seq is tried again
        lat.append(time.perf_counter() - t)
        seq += 1

    try:
        # one job takes the slot, `waiters` park behind it
        deadline = time.monotonic() + 60
        while seq < cfg["waiters"] + 1 and time.monotonic() < deadline:
            await enqueue_one()
        ready.set()
        if not await wait_event(go, 120):
            return {"fatal": "no start signal"}
        hard_end = time.monotonic() + cfg["max_seconds"]
        while not stop.value and time.monotonic() < hard_end:
            # strictly one Enqueue in flight: seq order = start-time order = job-id order
            if seq - granted.value < cfg["waiters"]:  # not yet leased = parked
                await enqueue_one()
            else:
                await asyncio.sleep(0.002)
        return {"enqueued": seq, "enqueue_latency_ms": pcts_ms(lat), **errs.dump()}
    finally:
        await ch.close(grace=1)


async def grant_worker(cfg: dict[str, Any], granted: Any, stop: Any, ready: Any,
                       go: Any) -> dict[str, Any]:
    """Hold the single slot, release it, poll for the next waiter; time release -> lease."""
    from silo._proto import silo_pb2 as pb

    ch, stub = await open_stub(cfg["target"])
    errs = Errors()
    res: dict[str, Any] = {"variants": {}}
    ok_bytes = pb.SerializedBytes(msgpack=b"\xc3")  # msgpack true
    expect_limit = pb.Limit(concurrency=pb.ConcurrencyLimit(key=GRANT_KEY, max_concurrency=1))
    violations: list[str] = []
    last_seq = -1

    def lease_req(variant: str) -> Any:
        r = pb.LeaseTasksRequest(worker_id=f"grant-{cfg['run']}", max_tasks=1, task_group=cfg["group"])
        if variant == "own-shard":
            r.shard = cfg["shard"]
        return r

    async def report(task: Any) -> float:
        req = pb.ReportOutcomeRequest(shard=task.shard, task_id=task.id, success=ok_bytes,
                                      tenant_id=task.tenant_id)
        while True:
            t = time.perf_counter()
            try:
                await stub.ReportOutcome(req, timeout=cfg["call_timeout"])
                return time.perf_counter() - t
            except Exception as e:
                errs.add("ReportOutcome", e)
                if "lease not found" in str(e):
                    return 0.0
                await asyncio.sleep(ERROR_SLEEP_S)

    def check(task: Any) -> None:
        nonlocal last_seq
        try:
            seq = int(task.job_id.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            violations.append(f"unexpected job {task.job_id!r}")
            return
        if seq != last_seq + 1:
            violations.append(f"granted #{seq} after #{last_seq} (expected #{last_seq + 1})")
        last_seq = max(last_seq, seq)
        if task.tenant_id != GRANT_TENANT or list(task.limits) != [expect_limit]:
            violations.append(f"job #{seq}: tenant {task.tenant_id!r} / limits {list(task.limits)}")

    async def poll_until_task(req: Any) -> tuple[Any, int, float]:
        """Tight LeaseTasks loop (no sleep); (task, polls, seconds) or (None, polls, s)."""
        polls = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < GRANT_WAIT_S:
            polls += 1
            try:
                r = await stub.LeaseTasks(req, timeout=cfg["call_timeout"])
            except Exception as e:
                errs.add("LeaseTasks", e)
                await asyncio.sleep(ERROR_SLEEP_S)
                continue
            if len(r.tasks) > 1:
                violations.append(f"LeaseTasks(max_tasks=1) returned {len(r.tasks)} tasks")
                for extra in r.tasks[1:]:
                    await report(extra)
            if r.tasks:
                return r.tasks[0], polls, time.perf_counter() - t0
        return None, polls, time.perf_counter() - t0

    try:
        ready.set()
        if not await wait_event(go, 120):
            return {"fatal": "no start signal"}
        hard_end = time.monotonic() + cfg["max_seconds"]
        holding, _, _ = await poll_until_task(lease_req(cfg["variants"][0]))
        if holding is None:
            return {"fatal": f"the first job was not leasable within {GRANT_WAIT_S:.0f} s", **errs.dump()}
        check(holding)
        granted.value += 1
        for variant in cfg["variants"]:
            req = lease_req(variant)
            lat: list[float] = []
            polls_per: list[int] = []
            report_lat: list[float] = []
            empty_lat: list[float] = []
            over = 0
            total = cfg["warmup_cycles"] + cfg["cycles"]
            t_start = time.monotonic()
            for i in range(total):
                if time.monotonic() >= hard_end:
                    violations.append(f"{variant}: time cap reached after {i} cycles")
                    break
                # while the slot is held, nobody else may be granted
                try:
                    tc = time.perf_counter()
                    r = await stub.LeaseTasks(req, timeout=cfg["call_timeout"])
                    if i >= cfg["warmup_cycles"] and not r.tasks:
                        empty_lat.append(time.perf_counter() - tc)
                    if r.tasks:
                        over += len(r.tasks)
                        violations.append(f"{variant}: job {r.tasks[0].job_id} leased while"
                                          f" {holding.job_id} held the only slot")
                        for extra in r.tasks:
                            check(extra)
                            await report(extra)
                except Exception as e:
                    errs.add("LeaseTasks", e)
                rl = await report(holding)
                t_rel = time.perf_counter()  # the release is durable: ReportOutcome returned
                nxt, polls, _ = await poll_until_task(req)
                t_grant = time.perf_counter()
                if nxt is None:
                    violations.append(f"{variant}: no waiter leased within {GRANT_WAIT_S:.0f} s"
                                      f" of a release ({polls} polls)")
                    holding = None
                    break
                check(nxt)
                granted.value += 1
                holding = nxt
                if i >= cfg["warmup_cycles"]:
                    lat.append(t_grant - t_rel)
                    polls_per.append(polls)
                    report_lat.append(rl)
            secs = time.monotonic() - t_start
            res["variants"][variant] = {
                "cycles": len(lat), "seconds": round(secs, 2),
                "grant_latency_ms": pcts_ms(lat),
                "polls_per_grant_mean": round(statistics.fmean(polls_per), 2) if polls_per else None,
                "polls_per_grant_max": max(polls_per, default=None),
                "grants_on_first_poll_pct": (round(100 * sum(p == 1 for p in polls_per) / len(polls_per), 1)
                                             if polls_per else None),
                "report_latency_ms": pcts_ms(report_lat),
                "empty_lease_latency_ms": pcts_ms(empty_lat),
                "over_grants": over,
                "cycles_per_s": round((cfg["warmup_cycles"] + len(lat)) / secs, 1) if secs else None,
                "raw_latency_ms": [round(x * 1000, 3) for x in lat],
            }
            if holding is None:
                break
        if holding is not None:
            await report(holding)
        res["violations"] = violations
        return {**res, **errs.dump()}
    finally:
        stop.value = 1
        await ch.close(grace=1)


def run_grant_latency(args: argparse.Namespace, server: Server, target: str) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    owners = topology(target)
    shard = route(owners, GRANT_TENANT)
    variants = ["any-shard", "own-shard"] if args.grant_poll == "both" else [args.grant_poll]
    cfg = {
        "target": target, "shard": shard, "run": f"g{os.getpid():x}{int(time.time()) % 100000:x}",
        "group": "bench-grant", "waiters": args.waiters, "cycles": args.cycles,
        "warmup_cycles": args.warmup_cycles, "variants": variants,
        "call_timeout": args.call_timeout,
        "max_seconds": args.grant_max_seconds,
    }
    granted = ctx.RawValue("q", 0)
    stop = ctx.RawValue("b", 0)
    go = ctx.Event()
    ready_e, ready_w = ctx.Event(), ctx.Event()
    q_e, q_w = ctx.Queue(), ctx.Queue()
    procs = []
    try:
        procs.append(spawn(ctx, "grant-enqueuer", "limits_grant:grant_enqueuer", cfg, granted, stop, ready_e, go, q_e))
        procs.append(spawn(ctx, "grant-worker", "limits_grant:grant_worker", cfg, granted, stop, ready_w, go, q_w))
        for ev, who, q in ((ready_e, "enqueuer", q_e), (ready_w, "worker", q_w)):
            deadline = time.monotonic() + CLIENT_START_TIMEOUT_S
            while not ev.wait(0.2):
                if time.monotonic() > deadline or not q.empty():
                    early = q.get(timeout=1) if not q.empty() else {"fatal": "start timeout"}
                    raise RuntimeError(f"grant {who} did not start: {early.get('fatal')}")
        print(f"[grant-latency] {args.waiters} waiters parked on tenant {GRANT_TENANT!r} key"
              f" {GRANT_KEY!r} (shard {shard[:8]}); {args.warmup_cycles}+{args.cycles} cycles"
              f" per variant: {', '.join(variants)}", file=sys.stderr, flush=True)
        snap0 = CpuSnap(server.pid, [p.pid for p in procs])
        go.set()
        hard = time.monotonic() + args.grant_max_seconds + 2 * args.call_timeout + 20
        worker_res: dict[str, Any] | None = None
        last_print, last_n = time.monotonic(), 0
        while worker_res is None and time.monotonic() < hard:
            try:
                worker_res = q_w.get(timeout=1.0)
            except Exception:
                now = time.monotonic()
                n = granted.value
                print(f"[grant-latency] t={now - snap0.t:5.1f}s grants={n} ({(n - last_n) / (now - last_print):.0f}/s)"
                      f" server_alive={server.alive()}", file=sys.stderr, flush=True)
                last_print, last_n = now, n
        snap1 = CpuSnap(server.pid, [p.pid for p in procs])
        stop.value = 1
        try:
            enq_res = q_e.get(timeout=args.call_timeout + 10)
        except Exception:
            enq_res = {"fatal": "enqueuer gave no result"}
    finally:
        stop.value = 1
        reap(procs)
    if worker_res is None:
        worker_res = {"fatal": "worker gave no result in time"}
    errors = Counter(worker_res.get("errors") or {}) + Counter(enq_res.get("errors") or {})
    msgs = Counter(worker_res.get("error_messages") or {}) + Counter(enq_res.get("error_messages") or {})
    out: dict[str, Any] = {
        "tenant": GRANT_TENANT, "key": GRANT_KEY, "shard": shard,
        "shard_process": server.shard_process().get(shard), "waiters": args.waiters,
        "variants": worker_res.get("variants") or {},
        "violations": worker_res.get("violations") or [],
        "enqueued": enq_res.get("enqueued"),
        "enqueue_latency_ms": enq_res.get("enqueue_latency_ms"),
        "errors": dict(errors), "error_total": sum(errors.values()), "error_messages": dict(msgs),
        "cpu": cpu_between(snap0, snap1),
    }
    for who, r in (("worker", worker_res), ("enqueuer", enq_res)):
        if "fatal" in r:
            out.setdefault("client_fatal", {})[who] = r["fatal"]
    if out.get("client_fatal") and not out["variants"]:
        out["fatal"] = "; ".join(f"{k}: {v}" for k, v in out["client_fatal"].items())
    return out


