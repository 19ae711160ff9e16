#!/usr/bin/env python3
"""Web UI page latency with many jobs on the node: every page, p50/p90/max per page.

    .venv/bin/python bench/webui.py [--jobs 100000] [--rounds 20] [--data-dir DIR]
        [--fill offline|grpc] [--fill-tenants 4] [--done 0.5]

Starts its own `silo serve` (ports 0, 2 worker processes, tenancy on) on a data dir
filled with --jobs jobs, then fetches each page --rounds times one after the other
(fewer, at least 3, for a page slow enough to take 15 s).

--fill offline (the default) builds the data dir before the server starts with
bench/fill.py (the shard's own ImportJobs path, minutes for 1,000,000 jobs): jobs
j0000000.. of --fill-tenants tenants t00.., fill.py's status mix (85 % Succeeded, 5 %
Failed, 3 % Cancelled, 5 % Waiting, 2 % Scheduled), task groups g0..g3, metadata
`customer=c<i % (N/1000)>` (each value shared by ~1,000 jobs of a tenant) and unique
`user`/`batch` values. With --data-dir the dir is kept and a later run with the same
--jobs/--fill-tenants reuses it (a `webui-fill.json` in it says what it holds), so the
pages can be measured again without filling again.

--fill grpc enqueues over gRPC instead (the old way: 20 tenants, two task groups,
metadata `customer=c<i % 100>` and a unique `order=o<i>`, 1 in 50 jobs with a
concurrency limit; completes a --done fraction of the group "work" through
LeaseTasks/ReportOutcome); slow, ~10 minutes per 100,000 jobs on the shared box.

Pages: overview, shard, job (shard given / searched), config, the job list (page 1, a
deep page reached by following "older" 10 times, status, metadata exact and prefix,
id, task group, tenant filters), SQL console (a GROUP BY over the status counters),
queues, one queue, task groups, one task group, tenants, one tenant. The target is
200 ms per page at 1,000,000 jobs (issue 11); rows over it are marked "SLOW".
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.cluster.shardmap import hash_tenant

LINE = re.compile(r"silo serving on (\S+) .* webui=http://(\S+)")
METRICS_LINE = re.compile(r"metrics serving on (\S+)/metrics")
OLDER = re.compile(r'href="([^"]+)" id="page-older"')
TENANTS = [f"t{i:02d}" for i in range(20)]
TARGET_MS = 200.0


def shard_of(owners, tenant: str) -> str:
    h = hash_tenant(tenant)
    return next(o.shard_id for o in owners if (not o.range_start or h >= o.range_start)
                and (not o.range_end or h < o.range_end))


RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
         grpc.StatusCode.DEADLINE_EXCEEDED}


async def retrying(method, req):
    """A loaded box may answer UNAVAILABLE/RESOURCE_EXHAUSTED: back off and retry."""
    for attempt in range(50):
        try:
            return await method(req, timeout=30)
        except grpc.aio.AioRpcError as e:
            if e.code() not in RETRY or attempt == 49:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def fill(addr: str, n: int, done_fraction: float, inflight: int = 256
               ) -> list[tuple[str, str, str]]:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.SiloStub(ch)
        owners = (await stub.GetClusterInfo(pb.GetClusterInfoRequest())).shard_owners
        ids: list[tuple[str, str, str]] = []
        counter = iter(range(n))

        async def one() -> None:
            for i in counter:
                tenant = TENANTS[i % len(TENANTS)]
                limits = ([pb.Limit(concurrency=pb.ConcurrencyLimit(
                    key=f"api-{i % 3}", max_concurrency=2))] if i % 50 == 0 else [])
                req = pb.EnqueueRequest(
                    shard=shard_of(owners, tenant), tenant=tenant,
                    task_group="work" if i % 2 else "mail", priority=50,
                    payload=pb.SerializedBytes(msgpack=b"\x81\xa1n\x01"), limits=limits,
                    metadata={"customer": f"c{i % 100}", "order": f"o{i}"})
                r = await retrying(stub.Enqueue, req)
                if len(ids) < 1000:
                    ids.append((shard_of(owners, tenant), tenant, r.id))

        await asyncio.gather(*(one() for _ in range(inflight)))
        target = int(n / 2 * done_fraction)
        finished = 0
        while finished < target:
            tasks = (await retrying(stub.LeaseTasks, pb.LeaseTasksRequest(
                worker_id="bench", max_tasks=min(500, target - finished),
                task_group="work"))).tasks
            if not tasks:
                break
            await asyncio.gather(*(retrying(stub.ReportOutcome, pb.ReportOutcomeRequest(
                shard=t.shard, task_id=t.id, tenant_id=t.tenant_id,
                success=pb.SerializedBytes(msgpack=b"\xc0"))) for t in tasks))
            finished += len(tasks)
        print(f"completed {finished} jobs of group 'work'")
        return ids


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def compactor_busy(metrics_url: str) -> tuple[float, float]:
    """(object-store requests the compactors made so far, the most L0 SSTs of any shard)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    requests = l0 = 0.0
    for line in text.splitlines():
        if line.startswith("silo_slatedb_object_store_requests_total{") and \
                'component="compactor"' in line:
            requests += float(line.rsplit(" ", 1)[1])
        elif line.startswith("silo_slatedb_l0_sst_count{"):
            l0 = max(l0, float(line.rsplit(" ", 1)[1]))
    return requests, l0


def settle(metrics_url: str, max_s: float, quiet_s: float = 5.0) -> float:
    """Wait (at most max_s) until no compactor has touched the store for quiet_s and
    every shard has at most 2 L0 SSTs: a server just opened on a fresh fill merges its
    L0 first, and pages read then measure the merge, not the page. Returns the wait."""
    t0 = time.perf_counter()
    last, since = compactor_busy(metrics_url)[0], time.perf_counter()
    while time.perf_counter() - t0 < max_s:
        time.sleep(1.0)
        requests, l0 = compactor_busy(metrics_url)
        if requests != last:
            last, since = requests, time.perf_counter()
        elif l0 <= 2 and time.perf_counter() - since >= quiet_s:
            break
    return time.perf_counter() - t0


def timed(url: str, rounds: int, budget_s: float = 15.0) -> tuple[list[float], int]:
    """--rounds fetches, or fewer (at least 3) once a page has taken budget_s; the first
    (cold: nothing of it in the block cache yet) is the list's first element."""
    out, status = [], 200
    start = time.perf_counter()
    for i in range(rounds):
        if i >= 3 and time.perf_counter() - start > budget_s:
            break
        t0 = time.perf_counter()
        status, _ = fetch(url)
        out.append((time.perf_counter() - t0) * 1000)
    return out, status


async def shard_of_tenant(addr: str, tenant: str) -> str:
    async with grpc.aio.insecure_channel(addr) as ch:
        info = await retrying(pb_grpc.SiloStub(ch).GetClusterInfo, pb.GetClusterInfoRequest())
    return shard_of(info.shard_owners, tenant)


def deep_page(web: str, start: str, hops: int) -> str:
    path = start
    for _ in range(hops):
        _, body = fetch(f"http://{web}{path}")
        m = OLDER.search(body)
        if not m:
            break
        path = html.unescape(m.group(1))
    return path


FILL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fill.py")


def fill_offline(d: str, jobs: int, tenants: int) -> None:
    """Fill d with bench/fill.py (one run per tenant), unless it already holds that."""
    marker = os.path.join(d, "webui-fill.json")
    want = {"jobs": jobs, "tenants": tenants}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                print(f"reusing the filled data dir {d} ({jobs} jobs)", flush=True)
                return
        raise SystemExit(f"{d} holds another fill ({marker}); give an empty --data-dir")
    t0 = time.perf_counter()
    per = jobs // tenants
    for t in range(tenants):
        n = per if t < tenants - 1 else jobs - per * (tenants - 1)
        subprocess.run([sys.executable, FILL, "--data-dir", d, "--jobs", str(n),
                        "--tenant", f"t{t:02d}", "--tenancy"], check=True,
                       # a loaded box can stall a large commit past the 10 s default
                       env={**os.environ, "SILO_WRITE_TIMEOUT_MS": "120000"})
    with open(marker, "w") as f:
        json.dump(want, f)
    took = time.perf_counter() - t0
    print(f"filled {jobs} jobs offline in {took:.1f} s ({jobs / took:.0f}/s)", flush=True)


def offline_pages(jobs: int, tenants: int) -> tuple[str, str, dict[str, str]]:
    """(tenant, job id, the pages whose filters differ from the gRPC fill's)."""
    per = jobs // tenants
    job = f"j{per // 2:07d}"
    return "t00", job, {
        "jobs meta exact": f"/jobs?key=customer&value=c{max(0, min(42, per // 1000 - 1))}",
        "jobs meta exact unique": f"/jobs?key=user&value=u{per // 2}",
        "jobs meta prefix": f"/jobs?key=batch&value=b{per // 2 // 10:06d}&match=prefix",
        "jobs group": "/jobs?group=g1",
        "task group": "/group?name=g1",
        "jobs status=Waiting": "/jobs?status=Waiting",
        "jobs status=Failed + tenant": "/jobs?status=Failed&tenant=t00",
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fill", choices=("offline", "grpc"), default="offline")
    ap.add_argument("--fill-tenants", type=int, default=4)
    ap.add_argument("--data-dir", default=None,
                    help="fill (or reuse) this data dir and keep it (default: a temp dir)")
    ap.add_argument("--done", type=float, default=0.5,
                    help="--fill grpc: fraction of group 'work' (half the jobs) to complete")
    ap.add_argument("--settle-s", type=float, default=120,
                    help="before measuring, wait at most this long for the server's "
                         "compaction to go quiet (0: measure at once)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = args.data_dir or tmp
        os.makedirs(d, exist_ok=True)
        if args.fill == "offline":
            fill_offline(d, args.jobs, max(1, args.fill_tenants))
        proc = subprocess.Popen(
            [sys.executable, "-m", "silo", "serve", "--data-dir", d, "--grpc-addr",
             "127.0.0.1:0", "--webui-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0",
             "--processes", "2", "--tenancy"],
            stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            metrics_url = ""
            for line in proc.stderr:
                mm = METRICS_LINE.search(line)
                if mm:
                    metrics_url = f"http://{mm.group(1)}/metrics"
                m = LINE.search(line)
                if m:
                    break
            else:
                raise SystemExit("server did not start")
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            addr, web = m.group(1), m.group(2)
            override: dict[str, str] = {}
            if args.fill == "grpc":
                t0 = time.perf_counter()
                ids = asyncio.run(fill(addr, args.jobs, args.done))
                took = time.perf_counter() - t0
                print(f"filled {args.jobs} jobs in {took:.1f} s ({args.jobs / took:.0f}/s)")
                shard, tenant, job = ids[len(ids) // 2]
            else:
                tenant, job, override = offline_pages(args.jobs, max(1, args.fill_tenants))
                shard = asyncio.run(shard_of_tenant(addr, tenant))
            q = urllib.parse.quote
            pages = {
                "overview /": "/",
                "shard": f"/shard?id={shard}",
                "job (shard given)": f"/job?id={job}&shard={shard}&tenant={tenant}",
                "job (tenant only)": f"/job?id={job}&tenant={tenant}",
                "config": "/config",
                "jobs page 1": "/jobs",
                "jobs deep (10 older)": deep_page(web, "/jobs", 10),
                "jobs status=Running": "/jobs?status=Running",
                "jobs status=Succeeded": "/jobs?status=Succeeded",
                "jobs meta exact": "/jobs?key=customer&value=c42",
                "jobs meta exact unique": "/jobs?key=order&value=o4242",
                "jobs meta prefix": "/jobs?key=order&value=o4242&match=prefix",
                "jobs id": f"/jobs?id={job}",
                "jobs group": "/jobs?group=mail",
                "jobs tenant": f"/jobs?tenant={tenant}",
                "sql console (counts)": "/sql?q=" + q(
                    "SELECT tenant, status_kind, SUM(cnt) AS n FROM tenant_counts "
                    "GROUP BY tenant, status_kind"),
                "queues": "/queues",
                "queue": "/queue?name=api-1",
                "task groups": "/groups",
                "task group": "/group?name=work",
                "tenants": "/tenants",
                "tenant": f"/tenant?name={tenant}",
            }
            for name, path in override.items():
                pages[name] = path
            if metrics_url and args.settle_s > 0:
                print(f"compaction settled after {settle(metrics_url, args.settle_s):.1f} s",
                      flush=True)
            print(f"{'page':24s} {'first':>8s} {'p50':>8s} {'p90':>8s} {'max':>8s}  (ms, "
                  f"{args.rounds} rounds, {args.jobs} jobs; first = cold cache)")
            for name, path in pages.items():
                got, status = timed(f"http://{web}{path}", args.rounds)
                ms = sorted(got)
                p50 = ms[len(ms) // 2]
                flag = "" if status == 200 else f"  HTTP {status}"
                flag += "  SLOW" if p50 > TARGET_MS else ""
                print(f"{name:24s} {got[0]:8.1f} {p50:8.1f} {ms[int(len(ms) * 0.9)]:8.1f} "
                      f"{ms[-1]:8.1f}  n={len(ms)}{flag}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    random.seed(1)
    raise SystemExit(main())
