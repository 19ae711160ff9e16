#!/usr/bin/env python3
"""Start and always stop the peers' servers: Redis and PostgreSQL on loopback, temp dirs.

    python3 bench/peers/servers.py redis [--mode everysec|always] [--port N]
    python3 bench/peers/servers.py postgres [--port N]

As a command it starts one server, prints its URL and waits until Ctrl-C or SIGTERM,
then stops it and removes its temp dir. `run.py` uses the context managers
`redis_server()` and `postgres_server()` from this module. Stdlib only.

- Both servers listen on 127.0.0.1 only (PostgreSQL's Unix socket is in its temp dir).
- Both run as a non-root user: when this script runs as root, as `postgres` (the
  Debian package's user) or, if that does not exist, as `silo-peers`, created with
  `useradd --system`. Otherwise as the calling user.
- Each server runs in its own session (Ctrl-C in the terminal reaches only this
  script) under `setpriv --pdeathsig`, so it also gets a signal if this script dies
  without running its clean-up (SIGKILL); the temp dir then stays behind
  (`/tmp/silo-peer-*`).
- Stop: Redis SIGTERM, PostgreSQL SIGINT (fast shutdown); SIGKILL after 15 s. Then the
  temp dir is removed. This runs in `finally`, also on Ctrl-C and SIGTERM.

Redis modes (both with AOF on; Redis's shipped default has AOF off, RDB snapshots only):
- `everysec`: `appendonly yes`, `appendfsync everysec`: the AOF is fsynced once a
  second in the background, so an acknowledged write is NOT yet durable (up to about
  1-2 s of acknowledged writes are lost on a power cut or kernel crash).
- `always`: `appendonly yes`, `appendfsync always`: Redis fsyncs the AOF before it
  sends the replies of an event-loop round, so an acknowledged write is durable.

PostgreSQL: `initdb` defaults (`fsync=on`, `synchronous_commit=on`), which this module
also passes explicitly: a COMMIT returns after its WAL is flushed, so it is durable.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RUN_USER_CANDIDATES = ("postgres", "silo-peers")
REDIS_MODES = ("everysec", "always")
PG_MAX_CONNECTIONS = 400


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    """A started server: its process, URL, temp dir and log file."""

    kind: str
    url: str
    port: int
    proc: subprocess.Popen
    tmpdir: Path
    log: Path
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_user() -> pwd.struct_passwd | None:
    """The non-root user to run servers as, created if needed; None when not root."""
    if os.geteuid() != 0:
        return None
    for name in RUN_USER_CANDIDATES:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    name = RUN_USER_CANDIDATES[-1]
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    name], check=True)
    return pwd.getpwnam(name)


def make_tmpdir(prefix: str, user: pwd.struct_passwd | None) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        os.chown(d, user.pw_uid, user.pw_gid)
    d.chmod(0o700)
    return d


def wrap_cmd(cmd: list[str], user: pwd.struct_passwd | None, deathsig: str) -> list[str]:
    """Run `cmd` as `user` with a parent-death signal, via util-linux setpriv."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if user is not None:
            raise ServerError("setpriv (util-linux) is needed to drop root privileges")
        return cmd
    pre = [setpriv, "--pdeathsig", deathsig]
    if user is not None:
        pre += ["--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--init-groups"]
    return pre + ["--"] + cmd


def spawn(cmd: list[str], tmpdir: Path, log: Path, user: pwd.struct_passwd | None,
          deathsig: str) -> subprocess.Popen:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if user is not None:
        env.update(HOME=str(tmpdir), USER=user.pw_name, LOGNAME=user.pw_name)
    with open(log, "ab") as out:
        if user is not None:
            os.chown(log, user.pw_uid, user.pw_gid)
        return subprocess.Popen(wrap_cmd(cmd, user, deathsig), cwd=tmpdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_process(proc: subprocess.Popen, sig: int) -> int | None:
    """Send `sig`, wait STOP_TIMEOUT_S, then SIGKILL. Returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    return proc.returncode


def wait_ready(check, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with {proc.returncode} before it was ready:\n"
                              + log.read_text(errors="replace")[-3000:])
        if check():
            return
        time.sleep(0.05)
    raise ServerError(f"{what} not ready after {READY_TIMEOUT_S:.0f} s:\n"
                      + log.read_text(errors="replace")[-3000:])


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


def redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def redis_server(mode: str = "everysec", port: int | None = None) -> Iterator[Server]:
    """Redis on 127.0.0.1 with AOF on and `appendfsync <mode>`, in a fresh temp dir."""
    if mode not in REDIS_MODES:
        raise ValueError(f"redis mode must be one of {REDIS_MODES}, not {mode!r}")
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server not found: run bench/peers/setup.sh")
    user = run_user()
    tmpdir = make_tmpdir(f"silo-peer-redis-{mode}-", user)
    log = tmpdir / "redis.log"
    proc = None
    try:
        port = port or free_port()
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
               "--dir", str(tmpdir), "--daemonize", "no", "--logfile", "",
               "--appendonly", "yes", "--appendfsync", mode]
        proc = spawn(cmd, tmpdir, log, user, "TERM")
        wait_ready(lambda: redis_ping(port), proc, "redis-server", log)
        yield Server(kind="redis", url=f"redis://127.0.0.1:{port}", port=port, proc=proc,
                     tmpdir=tmpdir, log=log,
                     settings={"appendonly": "yes", "appendfsync": mode})
    finally:
        try:
            if proc is not None:
                stop_process(proc, signal.SIGTERM)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------


def pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/N/bin with initdb (Debian layout), else PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ServerError("PostgreSQL's initdb not found: run bench/peers/setup.sh")
    return Path(initdb).parent


@contextlib.contextmanager
def postgres_server(port: int | None = None,
                    extra_settings: dict[str, str] | None = None) -> Iterator[Server]:
    """A fresh PostgreSQL cluster (initdb) on 127.0.0.1, as a non-root user, temp dir.

    `extra_settings` are more `-c name=value` server settings (they may override ours).
    """
    bindir = pg_bindir()
    user = run_user()
    tmpdir = make_tmpdir("silo-peer-pg-", user)
    log = tmpdir / "postgres.log"
    data = tmpdir / "data"
    proc = None
    try:
        init = spawn([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                      "-E", "UTF8", "--locale=C", "--no-instructions"],
                     tmpdir, log, user, "TERM")
        try:
            rc = init.wait(timeout=120)
        except subprocess.TimeoutExpired:
            init.kill()
            init.wait()
            rc = -9
        if rc != 0:
            raise ServerError(f"initdb failed ({rc}):\n" + log.read_text(errors="replace")[-3000:])
        port = port or free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(tmpdir),
            "max_connections": str(PG_MAX_CONNECTIONS),
            "fsync": "on",
            "synchronous_commit": "on",
        }
        settings.update(extra_settings or {})
        cmd = [str(bindir / "postgres"), "-D", str(data)]
        for k, v in settings.items():
            cmd += ["-c", f"{k}={v}"]
        proc = spawn(cmd, tmpdir, log, user, "INT")
        isready = [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port),
                   "-U", "postgres", "-d", "postgres"]

        def check() -> bool:
            return subprocess.run(isready, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10).returncode == 0

        wait_ready(check, proc, "postgres", log)
        yield Server(kind="postgres", url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
                     port=port, proc=proc, tmpdir=tmpdir, log=log, settings=settings)
    finally:
        try:
            if proc is not None:
                stop_process(proc, signal.SIGINT)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=("redis", "postgres"))
    ap.add_argument("--mode", choices=REDIS_MODES, default="everysec", help="redis only")
    ap.add_argument("--port", type=int, help="default: a free port")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    cm = redis_server(args.mode, args.port) if args.kind == "redis" else postgres_server(args.port)
    try:
        with cm as srv:
            print(f"{srv.kind} pid {srv.pid} serving on {srv.url} (dir {srv.tmpdir}); "
                  "Ctrl-C stops it", flush=True)
            while srv.proc.poll() is None:
                time.sleep(0.5)
            print(f"{srv.kind} exited with {srv.proc.returncode}:\n{srv.log_tail()}",
                  file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
