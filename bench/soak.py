#!/usr/bin/env python3
"""Soak: does storage settle? enqueue -> complete -> delete at a steady rate for N minutes.

    .venv/bin/python bench/soak.py [--minutes 10] [--rate 200] [--sample-s 10]
        [--store local|s3] [--tree DIR] [--label NAME] [--json out.json] [-- SERVER ARGS...]

Starts its own `silo serve` (1 shard, 1 process, temp data dir; with --store s3 a moto S3
server on loopback, as tests/integration/test_s3.py), then runs one client loop: Enqueue
at --rate jobs/s, a worker leasing and completing them, and DeleteJob of each finished
job, so the live set stays small and everything written becomes garbage. Every
--sample-s it lists the shard's objects and prints (and records): object count and
bytes (total and per directory: wal, compacted, manifest, compactions) and objects
written per second since the last sample (names not seen before; a GC that deletes
quickly still counts every object written).

--tree runs the server from another source tree (e.g. a checkout of main) to compare
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


async def load(addr: str, rate: float, stop_at: float, counts: dict[str, int]) -> None:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.SiloStub(ch)
        info = await stub.GetClusterInfo(pb.GetClusterInfoRequest())
        shard = info.shard_owners[0].shard_id
        payload = pb.SerializedBytes(msgpack=b"\xa8" + b"x" * 200)

        inflight = asyncio.Semaphore(256)

        async def enqueue_one() -> None:
            try:
                await stub.Enqueue(pb.EnqueueRequest(shard=shard, task_group=GROUP, priority=50,
                                                     payload=payload), timeout=30)
                counts["enqueued"] += 1
            except grpc.RpcError:
                counts["errors"] += 1
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
            except grpc.RpcError:
                counts["errors"] += 1  # e.g. the lease expired on an overloaded machine

        async def worker() -> None:
            while time.monotonic() < stop_at + 5:
                try:
                    r = await stub.LeaseTasks(pb.LeaseTasksRequest(
                        worker_id="soak", max_tasks=64, task_group=GROUP), timeout=30)
                except grpc.RpcError:
                    counts["errors"] += 1
                    await asyncio.sleep(0.1)
                    continue
                if not r.tasks:
                    if time.monotonic() > stop_at:
                        return
                    await asyncio.sleep(0.02)
                    continue
                await asyncio.gather(*(finish(t) for t in r.tasks))

        await asyncio.gather(producer(), worker())


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
            "written_total": len(seen)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=200, help="jobs per second")
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree of the server")
    ap.add_argument("--label", default="")
    ap.add_argument("--json", type=Path)
    ap.add_argument("server_args", nargs="*", help="after --: extra `silo serve` arguments")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="silo-soak-"))
    store = Store(args.store, tmp)
    proc = None
    samples: list[dict] = []
    try:
        proc, addr = start_server(tmp, store, args.tree.resolve(), args.server_args)
        counts = {"enqueued": 0, "deleted": 0, "errors": 0}
        t_start = time.monotonic()
        stop_at = t_start + args.minutes * 60
        seen: set[str] = set()

        async def run() -> None:
            task = asyncio.create_task(load(addr, args.rate, stop_at, counts))
            t_prev = time.monotonic()
            print(f"{'t_s':>6} {'jobs':>7} {'objects':>8} {'MB':>7} {'wal':>6} {'sst':>5} "
                  f"{'mfst':>5} {'cmpc':>5} {'put/s':>7} {'walMB':>6} {'sstMB':>6}", flush=True)
            while not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), args.sample_s)
                t = time.monotonic()
                s = await asyncio.to_thread(sample, store, seen, t, t_prev)
                s["t_s"] = round(t - t_start, 1)
                s["deleted"] = counts["deleted"]
                s["errors"] = counts["errors"]
                samples.append(s)
                d = s["by_dir"]
                print(f"{s['t_s']:>6.0f} {s['deleted']:>7} {s['objects']:>8} "
                      f"{s['bytes'] / 1e6:>7.2f} {d['wal']:>6} {d['compacted']:>5} "
                      f"{d['manifest']:>5} {d['compactions']:>5} {s['written_per_s']:>7.1f} "
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
        if args.json:
            args.json.write_text(json.dumps({
                "label": args.label, "store": args.store, "rate": args.rate,
                "minutes": args.minutes, "server_args": args.server_args,
                "tree": str(args.tree), "samples": samples}, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
