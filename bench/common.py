"""Helpers every bench script shares: starting a server, reading CPU, routing, stats.

Nothing here measures anything by itself. `ServerProc` starts `silo serve` (or
bench/noop_server.py) on port 0 in a temp dir and stops it safely; the /proc helpers
read CPU seconds of a process tree and of the whole machine (no psutil), so each
scenario can report server CPU per operation, the load generator's share and the
"other busy CPU" of a shared box; `cpu_by_process` gives the placement (CPU of each
worker process), which shows when the kernel put connections unevenly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY_RE = re.compile(r"silo serving on (\S+):(\d+)")
SERVER_READY_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 15.0
OTHER_LOAD_WARN_CORES = 0.25
NOOP_SERVER = Path(__file__).resolve().parent / "noop_server.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------------------
# /proc helpers (no psutil)
# ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on, so fields[11] is field 14 (utime); None if
    the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces/parens: split after the last ')'.
    return data[data.rindex(b")") + 2:].split()


def proc_cpu_s(pid: int) -> float | None:
    """utime+stime of one process (all its threads), in seconds; None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # utime, stime are fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return kids


def tree_cpu_by_pid(pid: int) -> dict[int, float]:
    """CPU seconds of a process and each of its live descendants, by pid ({} if gone)."""
    out: dict[int, float] = {}
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in out:
            continue
        c = proc_cpu_s(p)
        if c is not None:
            out[p] = c
            stack.extend(proc_children(p))
    return out


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and all its live descendants (a forking server counts whole)."""
    by_pid = tree_cpu_by_pid(pid)
    return sum(by_pid.values()) if pid in by_pid else None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    total = sum(vals[:8])  # guest time is already included in user/nice
    return float(total - idle), float(total)


def machine_info() -> dict[str, Any]:
    import grpc

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = dirty = None
    with contextlib.suppress(Exception):
        repo = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "silo"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "silo_commit": commit,
        "silo_tree_dirty": dirty,  # uncommitted changes under silo/ when the run started
        "loadavg_at_start": os.getloadavg()[0],
        "busy_pct_before_start": idle_check(),
    }


def idle_check(seconds: float = 1.0) -> float:
    """Share of all cores busy over `seconds` before the run: other load skews the figures."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    return round(100 * (b1 - b0) / max(1.0, t1 - t0), 1)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------


def percentiles_ms(samples_us: list[float]) -> dict[str, float | None]:
    keys = ("p50", "p90", "p99", "max")
    if not samples_us:
        return dict.fromkeys(keys)
    s = sorted(samples_us)
    n = len(s)

    def pick(q: float) -> float:
        # nearest rank
        i = max(0, min(n - 1, int(q * n + 0.999999) - 1))
        return round(s[i] / 1000.0, 3)

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": round(s[-1] / 1000.0, 3)}


# ---------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------


def xxh64_hex(tenant: str) -> str:
    import xxhash

    return f"{xxhash.xxh64_intdigest(tenant.encode('utf-8'), seed=0):016x}"


def shard_for(owners: list[tuple[str, str, str]], tenant: str) -> str:
    """Shard id whose [range_start, range_end) holds XXH64(tenant), as the client computes it."""
    key = xxh64_hex(tenant)
    for shard_id, start, end in owners:
        if (start == "" or start <= key) and (end == "" or key < end):
            return shard_id
    raise RuntimeError(f"no shard covers tenant {tenant!r} (hash {key})")


def fetch_topology(target: str, timeout: float = 10.0) -> list[tuple[str, str, str]]:
    import grpc

    from silo._proto import silo_pb2 as pb
    from silo._proto import silo_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as ch:
        resp = pb_grpc.SiloStub(ch).GetClusterInfo(pb.GetClusterInfoRequest(), timeout=timeout)
    owners = [(o.shard_id, o.range_start, o.range_end) for o in resp.shard_owners if o.grpc_addr]
    owners.sort(key=lambda o: o[1])
    if not owners:
        raise RuntimeError("GetClusterInfo returned no owned shard")
    return owners


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The flags every scenario script passes to the `silo serve` it starts (and --json)."""
    ap.add_argument("--shards", type=int, default=0,
                    help="shards of a self-started server (0 = silo's default: one per worker"
                         " process)")
    ap.add_argument("--processes", type=int, default=0,
                    help="worker processes of a self-started server (and of a no-op baseline)"
                         " (0 = silo's default: one per core, at most one per shard)")
    ap.add_argument("--flush-interval-ms", type=int, default=10,
                    help="`silo serve --flush-interval-ms` of a self-started server")
    ap.add_argument("--silo-bin", help="silo executable (default: the one next to this python)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra argument for `silo serve` (repeatable),"
                         " e.g. --server-arg=--log-level=warning")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the temp data dir(s) and server log(s)")
    ap.add_argument("--json", metavar="FILE", help="write the full report as JSON")


def server_processes(args: argparse.Namespace) -> int:
    """Worker processes of a self-started `silo serve`, as it resolves --processes 0
    (one per core we may run on, at most one per shard); the no-op server gets as many."""
    n = args.processes or len(os.sched_getaffinity(0))
    return max(1, min(n, shards_of(args)))


def shards_of(args: argparse.Namespace) -> int:
    """Shards of a self-started `silo serve`, as it resolves --shards 0 (one per worker
    process). Passed to the server resolved, so a --tree of before that default works."""
    return args.shards or args.processes or len(os.sched_getaffinity(0))


def reap(procs: list[Any]) -> None:
    """Stop client processes: SIGTERM each live one, then SIGKILL what is left after 5 s."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def interrupt_on_sigterm() -> None:
    """Make SIGTERM, and SIGINT even when started with it ignored, raise KeyboardInterrupt
    in the main thread, so a script's finally blocks stop its servers either way."""
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)


_interrupted = False  # a Ctrl-C / SIGTERM was held back while a server was being stopped


@contextlib.contextmanager
def defer_signals() -> Any:
    """Hold SIGINT/SIGTERM while stopping a server: a second Ctrl-C must not cut the
    stop short and leave the server (in its own session) running. main() then stops."""
    global _interrupted
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: held.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if held:
            _interrupted = True


# `silo` of the tree on PYTHONPATH (ServerProc with args.tree).
_TREE_MAIN = "import sys; from silo.cli import main; sys.exit(main())"


class ServerProc:
    """A `silo serve` subprocess (or, kind "noop", bench/noop_server.py) on 127.0.0.1,
    port 0, with its log (and data dir) in a temp dir."""

    def __init__(self, args: argparse.Namespace, kind: str = "silo"):
        assert kind in ("silo", "noop")
        self.args = args
        self.kind = kind
        self.tmp = Path(tempfile.mkdtemp(prefix=f"silo-bench-{kind}-"))
        self.log_path = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr: str | None = None
        self.exit_code: int | None = None
        self.starts = 0  # start() again after stop(): a restart on the same data dir
        self.poll_s = 0.05  # how often start() looks for the ready line
        self.spawn_t: float | None = None  # time.monotonic() just before the last spawn
        self.ready_t: float | None = None  # ... when its ready line was seen

    def command(self) -> list[str]:
        if self.kind == "noop":
            return [sys.executable, str(NOOP_SERVER), "--grpc-addr", "127.0.0.1:0",
                    "--processes", str(server_processes(self.args))]
        tree = getattr(self.args, "tree", None)
        if tree:  # the server of another source tree (e.g. a checkout before a change)
            silo_cmd = [sys.executable, "-c", _TREE_MAIN]
        else:
            silo_cmd = [self.args.silo_bin or shutil.which("silo")
                        or str(Path(sys.executable).parent / "silo")]
        cmd = [*silo_cmd, "serve", "--data-dir", str(self.tmp / "data"),
               "--grpc-addr", "127.0.0.1:0",
               # Side ports of their own (the defaults are fixed, 8080 and 9090), so a
               # server left running elsewhere does not stop ours; --server-arg comes
               # last and overrides. Not for --tree: an older tree may lack the flags.
               *([] if tree else ["--webui-addr", "127.0.0.1:0",
                                  "--metrics-addr", "127.0.0.1:0"]),
               "--flush-interval-ms", str(self.args.flush_interval_ms),
               "--shards", str(shards_of(self.args))]
        cmd.append("--tenancy" if self.args.tenants > 0 else "--no-tenancy")
        if self.args.processes:
            cmd += ["--processes", str(self.args.processes)]
        return cmd + self.args.server_arg

    def start(self, ready_timeout: float = SERVER_READY_TIMEOUT_S) -> str:
        """Spawn the server and wait for its ready line. Called again after stop(), it
        restarts the same command on the same data dir (a new log file per start)."""
        if self.alive():
            raise RuntimeError("server already running")
        cmd = self.command()
        self.cmd = cmd
        self.starts += 1
        self.log_path = self.tmp / ("server.log" if self.starts == 1 else f"server.{self.starts}.log")
        self.exit_code = None
        self.ready_t = None
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed right below; the child keeps its fd
        try:
            self.spawn_t = time.monotonic()
            # Own session: a Ctrl-C in the terminal reaches only us; we stop the server ourselves.
            tree = getattr(self.args, "tree", None) if self.kind == "silo" else None
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())} if tree else None
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True, env=env,
                                         cwd=str(Path(tree).resolve()) if tree else None)
        finally:
            log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            m = READY_RE.search(self.log_text())
            if m:
                self.ready_t = time.monotonic()
                host, port = m.group(1), m.group(2)
                if host not in ("127.0.0.1", "localhost"):
                    raise RuntimeError(f"server bound {host}, expected 127.0.0.1")
                self.addr = f"127.0.0.1:{port}"
                return self.addr
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} before ready:\n"
                                   + self.tail())
            time.sleep(self.poll_s)
        raise RuntimeError("server did not log its ready line in time:\n" + self.tail())

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s. Safe to call more than once. A Ctrl-C or
        SIGTERM arriving meanwhile is held until the server is gone (see defer_signals)."""
        with defer_signals():
            return self._stop()

    def _stop(self) -> int | None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server pid {p.pid} ignored SIGTERM for {SERVER_STOP_TIMEOUT_S:.0f} s: SIGKILL",
                      file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=10)
        if p is not None:
            self.exit_code = p.returncode
        return self.exit_code

    def cleanup(self) -> None:
        if not self.args.keep_data:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# CPU over a measured window (placement: CPU per server process)
# ---------------------------------------------------------------------------


class CpuWindow:
    """CPU of the server tree (per process), of the load generator and of the machine
    between start() and stop(): what the report needs to show server CPU per operation,
    where the kernel placed the work, and how busy other tenants of the box were."""

    def __init__(self, server_pid: int | None, loadgen_pids: list[int]) -> None:
        self.server_pid = server_pid
        self.loadgen_pids = loadgen_pids

    def _snap(self) -> tuple[float, dict[int, float], float, tuple[float, float]]:
        srv = tree_cpu_by_pid(self.server_pid) if self.server_pid else {}
        gen = sum(tree_cpu_s(p) or 0.0 for p in self.loadgen_pids)
        return time.monotonic(), srv, gen, machine_cpu()

    def start(self) -> None:
        self.a = self._snap()

    def stop(self) -> dict[str, Any]:
        b = self._snap()
        wall = b[0] - self.a[0]
        by_proc = {p: b[1][p] - self.a[1].get(p, 0.0) for p in b[1]}
        server = sum(by_proc.values())
        gen = b[2] - self.a[2]
        busy = (b[3][0] - self.a[3][0]) / CLK_TCK
        total = (b[3][1] - self.a[3][1]) / CLK_TCK
        return {
            "wall_s": round(wall, 3),
            "server_cpu_s": round(server, 3),
            "server_cores": round(server / wall, 3),
            # the supervisor first, then each worker process (placement)
            "server_cores_by_process": [round(by_proc[p] / wall, 3) for p in sorted(by_proc)],
            "loadgen_cores": round(gen / wall, 3),
            "machine_busy_pct": round(100 * busy / max(total, 1e-9), 1),
            "other_cpu_cores": round(max(0.0, busy - server - gen) / wall, 3),
        }


def proc_cpu_incl_reaped_s(pid: int) -> float | None:
    """utime+stime of a process and of its reaped children (cutime+cstime), seconds: for
    peers whose servers fork short-lived helpers."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def trees_cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes (with their reaped children) and all their live
    descendants."""
    seen: set[int] = set()
    total = 0.0
    stack = list(pids)
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        c = proc_cpu_incl_reaped_s(p)
        if c is None:
            continue
        total += c
        stack.extend(proc_children(p))
    return total


def busy_pct(seconds: float = 1.0) -> float:
    """Share of all cores busy over the next `seconds`."""
    b0, t0 = machine_cpu()
    time.sleep(seconds)
    b1, t1 = machine_cpu()
    return round(100 * (b1 - b0) / max(1.0, t1 - t0), 1)
