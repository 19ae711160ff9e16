#!/usr/bin/env python3
"""Peers on the same workload as bench/load.py: BullMQ on Redis, procrastinate on PostgreSQL.

    python3 bench/peers/run.py [--duration 10] [--peers bullmq-everysec,bullmq-always,procrastinate]
        [--scenario enqueue,e2e] [--json /tmp/silo-peers.json]
        [--ours-json FILE | --run-ours]

Needs `bench/peers/setup.sh` first. For each peer and each scenario: start a fresh
server (servers.py: loopback, temp dir, non-root), start --procs client processes
(bullmq_bench.mjs under node, or pg_bench.py in the peers' venv), start them at the
same instant, warm up, measure for --duration seconds, stop them, stop the server.
Then print a table, write the JSON report and, given our own report
(`bench/load.py --json FILE`, via --ours-json, or --run-ours to run it first),
the ratios ours/peer. The run script itself needs only the stdlib. See the "Peers"
section of bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import servers  # noqa: E402  (bench/peers/servers.py)
from common import busy_pct, machine_cpu, percentiles_ms, trees_cpu_s  # noqa: E402
from report import SCENARIOS, print_table, ratios  # noqa: E402  (bench/peers/report.py)

READY_TIMEOUT_S = 120.0

# name -> (server kind, redis mode, driver, what an acknowledged enqueue means)
PEERS: dict[str, tuple[str, str | None, str, str]] = {
    "bullmq-everysec": ("redis", "everysec", "bullmq",
                        "not durable: Redis AOF fsync once a second (appendfsync everysec)"),
    "bullmq-always": ("redis", "always", "bullmq",
                      "durable: AOF fsynced before the reply (appendfsync always)"),
    "procrastinate": ("postgres", None, "procrastinate",
                      "durable: PostgreSQL COMMIT, synchronous_commit=on, fsync=on"),
}



def wait_idle(args: argparse.Namespace, label: str) -> float:
    """Wait up to --wait-idle s for the machine to be under --idle-pct busy; returns busy %."""
    deadline = time.monotonic() + args.wait_idle
    busy = busy_pct()
    while busy > args.idle_pct and time.monotonic() < deadline:
        print(f"[{label}] machine {busy:.0f} % busy before the start; waiting for it to calm "
              f"down (up to {deadline - time.monotonic():.0f} s more)", file=sys.stderr, flush=True)
        time.sleep(3)
        busy = busy_pct(2.0)
    if busy > args.idle_pct:
        print(f"[{label}] WARNING: machine {busy:.0f} % busy before the start: figures skewed",
              file=sys.stderr, flush=True)
    return busy


# ---------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------


class Client:
    """One driver process; a thread reads its JSON lines."""

    def __init__(self, cmd: list[str], cwd: Path, stderr_path: Path):
        self.stderr_path = stderr_path
        self.err_file = open(stderr_path, "wb")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err_file, start_new_session=True)
        self.ready: dict[str, Any] | None = None
        self.tick: dict[str, Any] = {"enq": 0, "done": 0, "err": 0}
        self.result: dict[str, Any] | None = None
        self.events: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            kind = msg.get("type")
            if kind == "ready":
                self.ready = msg
            elif kind == "tick":
                self.tick = msg
            elif kind == "result":
                self.result = msg
            self.events.put(kind)
        self.events.put("eof")

    def start_at(self, epoch: float) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(f"{epoch!r}\n".encode())
            self.proc.stdin.close()

    def stderr_tail(self, n: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.reader.join(timeout=5)
        self.err_file.close()


def driver_cmd(driver: str, url: str, scenario: str, slot: int, args: argparse.Namespace,
               run_id: str) -> list[str]:
    common = ["--scenario", scenario, "--slot", str(slot), "--concurrency", str(args.concurrency),
              "--workers", str(args.workers), "--worker-concurrency", str(args.worker_concurrency),
              "--warmup", str(args.warmup), "--duration", str(args.duration),
              "--call-timeout", str(args.call_timeout), "--max-ops", str(args.max_ops),
              "--run-id", run_id]
    if driver == "bullmq":
        return [args.node, str(HERE / "bullmq_bench.mjs"), "--url", url] + common
    return ([str(venv_python(args)), str(HERE / "pg_bench.py"), "--dsn", url,
             "--pool-size", str(args.pg_pool_size)] + common)


def venv_python(args: argparse.Namespace) -> Path:
    return Path(args.venv) / "bin" / "python"


def run_clients(peer: str, scenario: str, srv: servers.Server, args: argparse.Namespace,
                logdir: Path) -> dict[str, Any]:
    label = f"{peer}/{scenario}"
    driver = PEERS[peer][2]
    run_id = f"{os.getpid():x}{int(time.time() * 1000) % 10**9:x}{scenario[0]}"
    clients: list[Client] = []
    try:
        for slot in range(args.procs):
            clients.append(Client(driver_cmd(driver, srv.url, scenario, slot, args, run_id),
                                  HERE, logdir / f"{peer}-{scenario}-client{slot}.stderr"))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for c in clients:
            while c.ready is None and c.result is None and c.proc.poll() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"client not ready after {READY_TIMEOUT_S:.0f} s")
                with contextlib.suppress(queue.Empty):
                    c.events.get(timeout=0.2)
            if c.ready is None:
                time.sleep(0.5)  # let the reader take the last lines
                raise RuntimeError(f"client exited before ready (rc {c.proc.poll()}): "
                                   f"{(c.result or {}).get('fatal', '')}\n{c.stderr_tail()}")
        busy_before = wait_idle(args, label)
        start_wall = time.time() + 0.5
        start_mono = time.monotonic() + (start_wall - time.time())
        for c in clients:
            c.start_at(start_wall)
        win_start = start_mono + args.warmup
        win_end = win_start + args.duration
        pids = [c.proc.pid for c in clients]

        def snap() -> dict[str, Any]:
            return {"t": time.monotonic(), "server": trees_cpu_s([srv.pid]),
                    "clients": trees_cpu_s(pids), "machine": machine_cpu()}

        s0 = s1 = None
        tick = start_mono + 1.0
        last_t, last = start_mono, (0, 0, 0)
        last_srv = trees_cpu_s([srv.pid])
        progress = []
        while s1 is None:
            nxt = min(x for x in (tick, win_start if s0 is None else None, win_end) if x is not None)
            time.sleep(max(0.0, nxt - time.monotonic()))
            now = time.monotonic()
            if s0 is None and now >= win_start:
                s0 = snap()
            if now >= win_end:
                s1 = snap()
            if now >= tick:
                tot = tuple(sum(c.tick.get(k, 0) for c in clients) for k in ("enq", "done", "err"))
                srv_cpu = trees_cpu_s([srv.pid])
                dtt = now - last_t
                mid = now - dtt / 2
                phase = "warmup" if mid < win_start else ("measure" if mid < win_end else "drain")
                rates = [(a - b) / dtt for a, b in zip(tot[:2], last[:2], strict=True)]
                line = f"[{label}] t={now - start_mono:5.1f}s {phase:7s} enq/s={rates[0]:7.0f}"
                if scenario == "e2e":
                    line += f" done/s={rates[1]:7.0f}"
                cpu = 100 * (srv_cpu - last_srv) / dtt
                line += f" errors={tot[2]} server_cpu={cpu:5.1f}%"
                print(line, file=sys.stderr, flush=True)
                progress.append({"t": round(now - start_mono, 2), "phase": phase,
                                 "enq_per_s": round(rates[0], 1), "done_per_s": round(rates[1], 1),
                                 "errors_total": tot[2], "server_cpu_pct": round(cpu, 1)})
                last_t, last, last_srv = now, tot, srv_cpu
                tick += 1.0
        # every client stops by itself by call-timeout + 10 s after the window
        deadline = time.monotonic() + args.call_timeout + 15
        for c in clients:
            try:
                c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"[{label}] client {c.proc.pid} overran: killed", file=sys.stderr)
            c.reader.join(timeout=5)
    finally:
        for c in clients:
            c.close()
    return summarize(scenario, args, clients, s0, s1, progress, busy_before)


def summarize(scenario: str, args: argparse.Namespace, clients: list[Client],
              s0: dict[str, Any], s1: dict[str, Any], progress: list[dict[str, Any]],
              busy_before: float) -> dict[str, Any]:
    window = s1["t"] - s0["t"]
    agg: dict[str, int] = dict.fromkeys(("enq_ok", "enq_ok_win", "done_ok", "done_ok_win",
                                         "stale_done_win"), 0)
    lats: dict[str, list[int]] = {"enq": [], "e2e": [], "complete": []}
    errors: dict[str, int] = {}
    msgs: dict[str, int] = {}
    problems = []
    info: dict[str, Any] = {}
    for slot, c in enumerate(clients):
        r = c.result
        if r is None:
            problems.append(f"client {slot}: no result (rc {c.proc.returncode}): {c.stderr_tail()}")
            continue
        if r.get("fatal") or r.get("hard_limit") or c.proc.returncode not in (0, None):
            problems.append(f"client {slot}: rc {c.proc.returncode} fatal={r.get('fatal')} "
                            f"hard_limit={r.get('hard_limit', False)}")
        info = info or r.get("info", {})
        for k in agg:
            agg[k] += r.get(k, 0)
        lats["enq"] += r.get("enq_lat_us", [])
        lats["e2e"] += r.get("e2e_lat_us", [])
        lats["complete"] += r.get("complete_lat_us", [])
        for k, v in r.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r.get("error_msgs", {}).items():
            msgs[k] = msgs.get(k, 0) + v
    srv_cpu = s1["server"] - s0["server"]
    cli_cpu = s1["clients"] - s0["clients"]
    mb = (s1["machine"][0] - s0["machine"][0]) / max(1.0, s1["machine"][1] - s0["machine"][1])

    def per(cpu: float, n: int) -> float | None:
        return round(cpu * 1e6 / n, 1) if n else None

    out: dict[str, Any] = {
        "window_s": round(window, 3),
        "info": info,
        "errors": errors, "error_total": sum(errors.values()), "error_messages": msgs,
        "problems": problems,
        "server_cpu_cores": round(srv_cpu / window, 3),
        "loadgen_cpu_cores": round(cli_cpu / window, 3),
        "machine_busy_pct": round(100 * mb, 1),
        "busy_pct_before_start": busy_before,
        "other_cpu_cores": round(mb * (os.cpu_count() or 1) - (srv_cpu + cli_cpu) / window, 2),
        "progress": progress,
    }
    # rates over the clients' own window (--duration by their wall clock)
    if scenario == "enqueue":
        n = agg["enq_ok_win"]
        out.update({
            "enqueues": n, "enqueues_total": agg["enq_ok"],
            "enqueue_per_s": round(n / args.duration, 1),
            "enqueue_latency_ms": percentiles_ms(lats["enq"]),
            "server_cpu_us_per_enqueue": per(srv_cpu, n),
            "loadgen_cpu_us_per_enqueue": per(cli_cpu, n),
        })
    else:
        n = agg["done_ok_win"]
        out.update({
            "completed": n, "completed_total": agg["done_ok"],
            "completed_from_other_runs": agg["stale_done_win"],
            "jobs_per_s": round(n / args.duration, 1),
            "enqueues": agg["enq_ok_win"],
            "enqueue_per_s": round(agg["enq_ok_win"] / args.duration, 1),
            "backlog_at_end": agg["enq_ok"] - agg["done_ok"],
            "e2e_latency_ms": percentiles_ms(lats["e2e"]),
            "enqueue_latency_ms": percentiles_ms(lats["enq"]),
            "complete_latency_ms": percentiles_ms(lats["complete"]),
            "server_cpu_us_per_job": per(srv_cpu, n),
            "loadgen_cpu_us_per_job": per(cli_cpu, n),
        })
    return out


def run_peer(peer: str, scenario: str, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    kind, mode, driver, durability = PEERS[peer]
    label = f"{peer}/{scenario}"
    print(f"[{label}] starting {kind}" + (f" (appendfsync {mode})" if mode else ""),
          file=sys.stderr, flush=True)
    pg_extra = dict(kv.split("=", 1) for kv in args.pg_setting)
    cm = (servers.redis_server(mode or "everysec") if kind == "redis"
          else servers.postgres_server(extra_settings=pg_extra))
    res: dict[str, Any] = {"durability": durability}
    srv = None
    try:
        with cm as srv:
            res["server"] = {"kind": kind, "url": srv.url, "settings": srv.settings}
            if driver == "procrastinate":
                setup = subprocess.run([str(venv_python(args)), str(HERE / "pg_bench.py"),
                                        "--dsn", srv.url, "--setup",
                                        "--prefill", str(args.pg_prefill)], cwd=HERE,
                                       capture_output=True, text=True, timeout=120)
                if setup.returncode != 0:
                    raise RuntimeError(f"schema setup failed: {setup.stderr[-2000:]}")
            res.update(run_clients(peer, scenario, srv, args, logdir))
            res["server_alive_after"] = srv.proc.poll() is None
            if not res["server_alive_after"]:
                res["server_log_tail"] = srv.log_tail()
    finally:
        if srv is not None:
            res["server_exit_code"] = srv.proc.returncode
    return res


# ---------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> Path:
    """Run bench/load.py's enqueue and e2e scenarios with the same clients and window."""
    out = Path(tempfile.mkdtemp(prefix="silo-peers-ours-")) / "ours.json"
    base = [args.ours_python, str(REPO / "bench" / "load.py"), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--procs", str(args.procs),
            "--concurrency", str(args.concurrency), "--workers", str(args.workers),
            "--json", str(out)]
    wait_idle(args, "ours")
    rc = None
    # a load.py without scenario lists rejects "enqueue,e2e" at once (exit 2): then "all"
    for scen in ("enqueue,e2e", "all"):
        cmd = base + ["--scenario", scen]
        print("[ours] " + " ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, cwd=REPO).returncode
        if out.exists() or rc != 2:
            break
    if not out.exists():
        raise RuntimeError(f"bench/load.py exited {rc} without writing {out}")
    return out


def ours_figures(path: Path) -> dict[str, Any]:
    """The figures of bench/load.py's JSON report that the peers also have."""
    rep = json.loads(Path(path).read_text())
    sc = rep.get("scenarios", {})
    # bench/load.py names the e2e scenario `saturation` (alias `e2e`) since it has more
    enq, e2e = sc.get("enqueue", {}), sc.get("e2e") or sc.get("saturation") or {}
    return {
        "file": str(path), "date": rep.get("date"),
        "commit": rep.get("machine", {}).get("silo_commit"),
        "config": {k: rep.get("config", {}).get(k) for k in
                   ("procs", "concurrency", "workers", "duration_s", "warmup_s",
                    "flush_interval_ms", "shards", "server_processes")},
        "enqueue": {
            "enqueue_per_s": enq.get("enqueue_per_s"),
            "enqueue_latency_ms": enq.get("enqueue_latency_ms", {}),
            "server_cpu_us_per_enqueue": enq.get("server_cpu_us_per_enqueue"),
            "server_cpu_cores": enq.get("server_cpu_cores"),
            "loadgen_cpu_cores": enq.get("loadgen_cpu_cores"),
            "other_cpu_cores": enq.get("other_cpu_cores"),
            "error_total": enq.get("error_total"),
        } if enq else None,
        "e2e": {
            "jobs_per_s": e2e.get("jobs_per_s"),
            "e2e_latency_ms": e2e.get("e2e_latency_ms", {}),
            "enqueue_latency_ms": e2e.get("enqueue_latency_ms", {}),
            "server_cpu_us_per_job": e2e.get("server_cpu_us_per_job"),
            "enqueue_per_s": e2e.get("enqueue_per_s"),
            "backlog_at_end": e2e.get("backlog_at_end"),
            "server_cpu_cores": e2e.get("server_cpu_cores"),
            "loadgen_cpu_cores": e2e.get("loadgen_cpu_cores"),
            "other_cpu_cores": e2e.get("other_cpu_cores"),
            "error_total": e2e.get("error_total"),
        } if e2e else None,
    }


# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated: " + ", ".join(PEERS))
    ap.add_argument("--scenario", default="enqueue,e2e", help="enqueue, e2e, both comma-separated, or all")
    ap.add_argument("--duration", type=float, default=10.0, help="measured window, seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="load before the window, seconds")
    ap.add_argument("--procs", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=64,
                    help="enqueues in flight per client process (e2e: half of it)")
    ap.add_argument("--workers", type=int, default=4, help="e2e: workers per client process")
    ap.add_argument("--worker-concurrency", type=int, default=16,
                    help="e2e: jobs each worker holds at once (ours: 16 leased per LeaseTasks)")
    ap.add_argument("--pg-pool-size", type=int, default=0,
                    help="procrastinate: connections per client process; 0: one per call in flight")
    ap.add_argument("--pg-prefill", type=int, default=0,
                    help="procrastinate: finished jobs to put in the table (then VACUUM ANALYZE) "
                         "before the run: a table with history and planner statistics")
    ap.add_argument("--pg-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="procrastinate: extra PostgreSQL server setting, repeatable")
    ap.add_argument("--call-timeout", type=float, default=10.0, help="deadline of each call, s")
    ap.add_argument("--max-ops", type=int, default=10_000_000, help="cap on each client loop")
    ap.add_argument("--json", default="/tmp/silo-peers.json", help="write the report here")
    ap.add_argument("--ours-json", help="a bench/load.py --json report: print ratios ours/peer")
    ap.add_argument("--run-ours", action="store_true",
                    help="first run bench/load.py (--scenario all, same duration and clients)")
    ap.add_argument("--from-json", metavar="PEERS_JSON",
                    help="run nothing: print the table of an earlier report of this script "
                         "(with --ours-json: and the ratios, also written to --json)")
    ap.add_argument("--ours-python", default=sys.executable,
                    help="python that runs bench/load.py with --run-ours (Silo's venv)")
    ap.add_argument("--node", default=shutil.which("node") or "node")
    ap.add_argument("--venv", default=os.environ.get("VENV") or str(HERE / ".venv"),
                    help="the venv setup.sh put procrastinate in")
    ap.add_argument("--wait-idle", type=float, default=90.0,
                    help="before each run, wait up to this long for the machine to be idle")
    ap.add_argument("--idle-pct", type=float, default=15.0,
                    help="'idle' = at most this %% of all cores busy over 2 s")
    args = ap.parse_args(argv)
    args.peer_list = [p.strip() for p in args.peers.split(",") if p.strip()]
    bad = [p for p in args.peer_list if p not in PEERS]
    if bad:
        ap.error(f"unknown peer(s) {bad}; known: {list(PEERS)}")
    scen = args.scenario.replace("all", "enqueue,e2e")
    args.scenarios = [s for s in SCENARIOS if s in {x.strip() for x in scen.split(",")}]
    if not args.scenarios:
        ap.error("--scenario: enqueue, e2e or both")
    return args


def check_setup(args: argparse.Namespace) -> list[str]:
    missing = []
    drivers = {PEERS[p][2] for p in args.peer_list}
    kinds = {PEERS[p][0] for p in args.peer_list}
    if "bullmq" in drivers:
        if not (HERE / "node" / "node_modules" / "bullmq").is_dir():
            missing.append("bench/peers/node/node_modules/bullmq")
        if shutil.which(args.node) is None:
            missing.append(f"node ({args.node})")
    if "procrastinate" in drivers and not venv_python(args).exists():
        missing.append(f"{venv_python(args)} (the peers' venv)")
    if "redis" in kinds and shutil.which("redis-server") is None:
        missing.append("redis-server")
    if "postgres" in kinds:
        try:
            servers.pg_bindir()
        except servers.ServerError:
            missing.append("PostgreSQL (initdb)")
    return missing


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        if args.ours_json:
            report["ours"] = ours_figures(Path(args.ours_json))
            report["ratios"] = ratios(report["ours"], report["peers"])
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            print(f"JSON report with ratios written to {args.json}", file=sys.stderr)
        print_table(report)
        return 0
    missing = check_setup(args)
    if missing:
        print("missing: " + ", ".join(missing) + "\nrun bench/peers/setup.sh first", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(),
                    "loadavg_at_start": os.getloadavg()[0], "busy_pct_at_start": busy_pct()},
        "config": {"procs": args.procs, "concurrency": args.concurrency, "workers": args.workers,
                   "worker_concurrency": args.worker_concurrency, "duration_s": args.duration,
                   "warmup_s": args.warmup, "call_timeout_s": args.call_timeout,
                   "scenarios": args.scenarios, "argv": sys.argv},
        "peers": {},
    }
    rc = 0
    logdir = Path(tempfile.mkdtemp(prefix="silo-peers-logs-"))
    try:
        if args.run_ours:
            args.ours_json = str(run_ours(args))
        for peer in args.peer_list:
            res: dict[str, Any] = {"durability": PEERS[peer][3]}
            report["peers"][peer] = res
            for scen in args.scenarios:
                try:
                    res[scen] = run_peer(peer, scen, args, logdir)
                except (RuntimeError, servers.ServerError, subprocess.SubprocessError) as e:
                    res[scen] = {"error_total": 0, "problems": [f"{type(e).__name__}: {e}"]}
                    rc = 1
                    print(f"[{peer}/{scen}] FAILED: {e}", file=sys.stderr)
                r = res[scen]
                if r.get("error_total") or r.get("problems"):
                    rc = 1
                res["info"] = res.get("info") or r.get("info")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        rc = 130
    if args.ours_json:
        try:
            report["ours"] = ours_figures(Path(args.ours_json))
            report["ratios"] = ratios(report["ours"], report["peers"])
        except (OSError, ValueError) as e:
            print(f"cannot read --ours-json {args.ours_json}: {e}", file=sys.stderr)
            rc = rc or 1
    if report["peers"]:
        print_table(report)
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        print(f"\nJSON report written to {args.json}; client stderr in {logdir}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
