#!/usr/bin/env python3
"""Soak: does storage settle? enqueue -> complete -> delete at a steady rate for N minutes.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 100] [--sample-s 10]
        [--store local|s3] [--tree DIR] [--label NAME] [--json out.json]
        [--workers 4] [--warmup-s 180] [--tolerance 0.15] [--quiet] [-- SERVER ARGS...]
    .venv/bin/python bench/soak.py --report run.json [more.json ...]

Starts its own `silo serve` (1 shard, 1 process, temp data dir; with --store s3 it also
starts a moto S3 server on loopback, as tests/integration/test_s3.py, and stops it at
the end), then runs one client: Enqueue at --rate jobs/s (open loop), --workers loops
leasing and completing them, and DeleteJob of each finished job, so the live set stays
small and everything written becomes garbage. Every --sample-s it lists the shard's
objects and records object count and bytes (total and per directory: wal, compacted =
SSTs, manifest, compactions), objects written per second (names not seen before: a GC
that deletes quickly still counts every object written; each is a PUT on S3), the LSM
tree from the manifest (L0 SSTs / sorted runs) and the load average.

At the end it prints a table (one row a minute) and a verdict: FLAT when, past
--warmup-s, the second half's maximum object count and bytes are each within
--tolerance of the first half's maximum (see `flatness`).

--tree runs the server from another source tree (e.g. an export of main) to compare
settings "before" and "after"; arguments after `--` go to `silo serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from silo._proto import silo_pb2 as pb  # noqa: E402
from silo._proto import silo_pb2_grpc as pb_grpc  # noqa: E402

READY = re.compile(r"silo serving on (\S+)")
GROUP = "soak"
DIRS = ("wal", "compacted", "manifest", "compactions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """Lists the objects of the server's store: a local directory or a moto bucket."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.env: dict[str, str] = {}
        self.args: list[str] = []
        self.moto: subprocess.Popen[bytes] | None = None
        self.url_for_admin = (tmp / "data" / "objects").as_uri()
        if kind == "s3":
            self._start_moto()

    def _start_moto(self) -> None:
        moto = Path(sys.executable).parent / "moto_server"
        port = _free_port()
        self.moto = subprocess.Popen([str(moto if moto.exists() else "moto_server"), "-H",
                                      "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        urllib.request.urlopen(urllib.request.Request(f"{url}/soak", method="PUT"),
                               timeout=5).read()
        self.url = url
        self.env = {"AWS_ENDPOINT": url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
                    "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
        self.args = ["--object-store-url", "s3://soak/silo"]
        self.url_for_admin = "s3://soak/silo"
        os.environ.update(self.env)

    def list(self) -> dict[str, int]:
        """Object name -> size."""
        if self.kind == "local":
            root = self.tmp / "data" / "objects"
            out = {}
            for dirpath, _, files in os.walk(root):
                for f in files:
                    p = Path(dirpath) / f
                    with contextlib.suppress(FileNotFoundError):
                        out[str(p.relative_to(root))] = p.stat().st_size
            return out
        import boto3  # noqa: PLC0415 - moto's dependency, only for --store s3

        s3 = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        out = {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="soak"):
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def close(self) -> None:
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(10)


def start_server(tmp: Path, store: Store, tree: Path, extra: list[str]) -> tuple[subprocess.Popen,
                                                                                   str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SILO_")}
    env.update(store.env)
    env["PYTHONPATH"] = str(tree)
    log = open(tmp / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "silo", "serve", "--data-dir", str(tmp / "data"), "--grpc-addr",
         "127.0.0.1:0", "--shards", "1", "--processes", "1", "--lease-ms", "60000",
         "--no-webui-enabled", "--metrics-addr=127.0.0.1:0",
         *store.args, *extra],
        stdout=log, stderr=log, env=env, cwd=tree, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = READY.search((tmp / "server.log").read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])


def _error(counts: dict, rpc: str, e: grpc.RpcError) -> None:
    counts["errors"] += 1
    key = f"{rpc} {e.code().name if e.code() else '?'}"
    by = counts.setdefault("errors_by", {})
    by[key] = by.get(key, 0) + 1


async def load(addr: str, rate: float, stop_at: float, counts: dict, workers: int) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.SiloStub(ch)
        info = await stub.GetClusterInfo(pb.GetClusterInfoRequest())
        shard = counts["shard"] = info.shard_owners[0].shard_id
        payload = pb.SerializedBytes(msgpack=b"\xa8" + b"x" * 200)

        inflight = asyncio.Semaphore(256)

        async def enqueue_one() -> None:
            try:
                await stub.Enqueue(pb.EnqueueRequest(shard=shard, task_group=GROUP, priority=50,
                                                     payload=payload), timeout=30)
                counts["enqueued"] += 1
            except grpc.RpcError as e:
                _error(counts, "Enqueue", e)
            finally:
                inflight.release()

        async def producer() -> None:
            """Open loop at `rate`: a slow answer does not slow the next Enqueue."""
            n, t0, pending = 0, time.monotonic(), set()
            while time.monotonic() < stop_at:
                n += 1
                await inflight.acquire()
                t = asyncio.create_task(enqueue_one())
                pending.add(t)
                t.add_done_callback(pending.discard)
                ahead = t0 + n / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await asyncio.gather(*pending)

        async def finish(task: pb.Task) -> None:
            try:
                await stub.ReportOutcome(pb.ReportOutcomeRequest(
                    shard=shard, task_id=task.id, success=pb.SerializedBytes(msgpack=b"\xc0")),
                    timeout=30)
                await stub.DeleteJob(pb.DeleteJobRequest(shard=shard, id=task.job_id),
                                     timeout=30)
                counts["deleted"] += 1
            except grpc.RpcError as e:  # e.g. the lease expired on an overloaded machine
                _error(counts, "ReportOutcome/DeleteJob", e)

        async def worker() -> None:
            while time.monotonic() < stop_at + 5:
                try:
                    r = await stub.LeaseTasks(pb.LeaseTasksRequest(
                        worker_id="soak", max_tasks=64, task_group=GROUP), timeout=30)
                except grpc.RpcError as e:
                    _error(counts, "LeaseTasks", e)
                    await asyncio.sleep(0.1)
                    continue
                if not r.tasks:
                    if time.monotonic() > stop_at:
                        return
                    await asyncio.sleep(0.02)
                    continue
                await asyncio.gather(*(finish(t) for t in r.tasks))

        await asyncio.gather(producer(), *(worker() for _ in range(workers)))


def sample(store: Store, seen: set[str], t: float, t_prev: float) -> dict:
    objs = store.list()
    new = [k for k in objs if k not in seen]
    seen.update(new)
    by_dir = {d: 0 for d in DIRS}
    bytes_by_dir = {d: 0 for d in DIRS}
    for k, size in objs.items():
        parts = k.split("/")
        for d in DIRS:
            if d in parts[:-1]:
                by_dir[d] += 1
                bytes_by_dir[d] += size
    return {"objects": len(objs), "bytes": sum(objs.values()), "by_dir": by_dir,
            "bytes_by_dir": bytes_by_dir,
            "written_per_s": round(len(new) / max(t - t_prev, 1e-9), 1),
            "written_total": len(seen), "load1": round(os.getloadavg()[0], 2),
            "written_by_dir": {d: sum(1 for k in seen if d in k.split("/")[:-1])
                               for d in DIRS}}


async def lsm(store: Store, shard: str) -> dict:
    """The shard's LSM tree from its manifest: L0 SSTs and sorted runs (id, bytes)."""
    from silo.storage.admin import storage_info  # noqa: PLC0415 - after sys.path is set

    try:
        li = await storage_info(store.url_for_admin, shard)
    except Exception as e:  # noqa: BLE001 - a sample without it is still a sample
        return {"error": str(e)[:200]}
    return {"l0": li.l0_sst_count, "l0_bytes": li.total_l0_size,
            "runs": [[r.id, r.estimated_size] for r in li.sorted_runs]}


# ---- the report ---------------------------------------------------------------------


def flatness(samples: list[dict], warmup_s: float, tolerance: float,
             rate: float = 0.0) -> dict:
    """Is storage flat past warm-up? Samples after warmup_s are split in two halves by
    time; flat = the second half's maximum object count and bytes are each at most
    (1 + tolerance) x the first half's maximum (a sawtooth between GC cycles is fine,
    a level that keeps rising is not). When the server fell behind the offered rate
    (more than 10 s of jobs live at once), the bytes include that backlog's live rows:
    the verdict says so."""
    window = [s for s in samples if s["t_s"] >= warmup_s]
    if len(window) < 4:
        return {"verdict": "too short", "warmup_s": warmup_s}
    mid = (window[0]["t_s"] + window[-1]["t_s"]) / 2
    first = [s for s in window if s["t_s"] <= mid]
    second = [s for s in window if s["t_s"] > mid]
    out: dict = {"warmup_s": warmup_s, "tolerance": tolerance,
                 "window_s": [window[0]["t_s"], window[-1]["t_s"]]}
    flat = True
    for key in ("objects", "bytes"):
        a, b = max(s[key] for s in first), max(s[key] for s in second)
        ratio = b / a if a else float("inf")
        out[key] = {"first_half_max": a, "second_half_max": b, "ratio": round(ratio, 3)}
        flat = flat and ratio <= 1 + tolerance
    out["verdict"] = "FLAT" if flat else "NOT FLAT"
    out["max_live"] = max(s["live"] for s in window)
    if rate > 0 and out["max_live"] > rate * 10:
        out["verdict"] += (f" (server fell behind: up to {out['max_live']:,} jobs live; "
                           "the bytes include their rows)")
    return out


def _lsm_cell(s: dict) -> str:
    m = s.get("lsm") or {}
    if "l0" not in m:
        return "?"
    return f"{m['l0']}/{len(m['runs'])}"


def report(run: dict, every_s: float = 60) -> str:
    """A compact table (one row per `every_s`) and the flatness verdict."""
    samples = run["samples"]
    lines = [f"soak {run['label'] or run['tree']}: store={run['store']} rate={run['rate']:g}/s "
             f"minutes={run['minutes']:g} server_args={' '.join(run['server_args']) or '-'}",
             "| t (s) | jobs done | live | objects | MB | WAL obj | SST obj | manifests | "
             "L0/runs | WAL MB | SST MB | objects written/s | load1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    next_t, prev = every_s, None
    for s in samples:
        if s["t_s"] + 1e-9 < next_t and s is not samples[-1]:
            continue
        dt = s["t_s"] - (prev["t_s"] if prev else 0)
        written = s["written_total"] - (prev["written_total"] if prev else 0)
        d, b = s["by_dir"], s["bytes_by_dir"]
        lines.append(
            f"| {s['t_s']:.0f} | {s['deleted']:,} | {s['live']:,} | {s['objects']:,} | "
            f"{s['bytes'] / 1e6:.1f} | {d['wal']:,} | {d['compacted']:,} | {d['manifest']} | "
            f"{_lsm_cell(s)} | {b['wal'] / 1e6:.1f} | {b['compacted'] / 1e6:.1f} | "
            f"{written / max(dt, 1e-9):.1f} | {s['load1']:.1f} |")
        prev = s
        while next_t <= s["t_s"] + 1e-9:
            next_t += every_s
    if samples:
        total_s = samples[-1]["t_s"]
        lines.append(f"objects written: {samples[-1]['written_total']:,} in {total_s:.0f} s "
                     f"= {samples[-1]['written_total'] / max(total_s, 1e-9):.1f}/s (each a PUT "
                     f"on S3); jobs done {samples[-1]['deleted'] / max(total_s, 1e-9):.1f}/s; "
                     f"errors {samples[-1]['errors']} {run.get('errors_by') or ''}")
        by = samples[-1].get("written_by_dir")
        if by:
            lines.append("objects written per second by kind: " + ", ".join(
                f"{d} {n / max(total_s, 1e-9):.2f}" for d, n in by.items()))
    f = run["flatness"]
    if "objects" in f:
        lines.append(
            f"flatness after {f['warmup_s']:.0f} s warm-up (window {f['window_s'][0]:.0f}-"
            f"{f['window_s'][1]:.0f} s; flat = 2nd half max <= {1 + f['tolerance']:.2f} x "
            f"1st half max): objects {f['objects']['first_half_max']:,} -> "
            f"{f['objects']['second_half_max']:,} ({f['objects']['ratio']:.2f}x), bytes "
            f"{f['bytes']['first_half_max'] / 1e6:.1f} -> "
            f"{f['bytes']['second_half_max'] / 1e6:.1f} MB ({f['bytes']['ratio']:.2f}x): "
            f"{f['verdict']}")
    else:
        lines.append(f"flatness: {f['verdict']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=100, help="jobs per second")
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--workers", type=int, default=4,
                    help="concurrent lease -> complete -> delete loops (an object store "
                    "with slow PUTs needs several to keep up with --rate)")
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree of the server")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--warmup-s", type=float, default=180,
                    help="samples before this are left out of the flatness verdict")
    ap.add_argument("--tolerance", type=float, default=0.15,
                    help="flat = 2nd half max <= (1 + this) x 1st half max")
    ap.add_argument("--quiet", action="store_true", help="no line per sample")
    ap.add_argument("--every-s", type=float, default=60, help="report: one row per this")
    ap.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                    help="only print the report of saved runs (--json files), verdict "
                    "recomputed with --warmup-s / --tolerance")
    ap.add_argument("server_args", nargs="*", help="after --: extra `silo serve` arguments")
    args = ap.parse_args()
    if args.report:
        for path in args.report:
            run = json.loads(path.read_text())
            run["flatness"] = flatness(run["samples"], args.warmup_s, args.tolerance,
                                       run["rate"])
            print(report(run, args.every_s) + "\n", flush=True)
        return 0

    # SIGTERM (and SIGINT, which a background job ignores) end the run cleanly: the
    # finally below stops the server and moto and removes the temp dir.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
    tmp = Path(tempfile.mkdtemp(prefix="silo-soak-"))
    store = Store(args.store, tmp)
    proc = None
    samples: list[dict] = []
    counts: dict = {"enqueued": 0, "deleted": 0, "errors": 0}
    try:
        proc, addr = start_server(tmp, store, args.tree.resolve(), args.server_args)
        t_start = time.monotonic()
        stop_at = t_start + args.minutes * 60
        seen: set[str] = set()

        async def run() -> None:
            task = asyncio.create_task(load(addr, args.rate, stop_at, counts, args.workers))
            t_prev = time.monotonic()
            if not args.quiet:
                print(f"{'t_s':>6} {'done':>7} {'live':>6} {'objects':>8} {'MB':>7} "
                      f"{'wal':>6} {'sst':>5} {'mfst':>5} {'L0/SR':>6} {'put/s':>7} "
                      f"{'walMB':>6} {'sstMB':>6}", flush=True)
            while not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), args.sample_s)
                t = time.monotonic()
                s = await asyncio.to_thread(sample, store, seen, t, t_prev)
                s["t_s"] = round(t - t_start, 1)
                s["deleted"] = counts["deleted"]
                s["live"] = counts["enqueued"] - counts["deleted"]
                s["errors"] = counts["errors"]
                if "shard" in counts:
                    s["lsm"] = await lsm(store, counts["shard"])
                samples.append(s)
                d = s["by_dir"]
                if not args.quiet:
                    print(f"{s['t_s']:>6.0f} {s['deleted']:>7} {s['live']:>6} "
                          f"{s['objects']:>8} {s['bytes'] / 1e6:>7.2f} {d['wal']:>6} "
                          f"{d['compacted']:>5} {d['manifest']:>5} {_lsm_cell(s):>6} "
                          f"{s['written_per_s']:>7.1f} "
                          f"{s['bytes_by_dir']['wal'] / 1e6:>6.1f} "
                          f"{s['bytes_by_dir']['compacted'] / 1e6:>6.1f}", flush=True)
                t_prev = t
            task.result()

        asyncio.run(run())
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"label": args.label, "store": args.store, "rate": args.rate,
              "minutes": args.minutes, "server_args": args.server_args,
              "tree": str(args.tree), "samples": samples,
              "errors_by": counts.get("errors_by", {}),
              "flatness": flatness(samples, args.warmup_s, args.tolerance, args.rate)}
    print(report(result, args.every_s), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
