"""First use of the `silo` command line: README's commands as written, a closed pipe,
JSON errors, exit codes of finished jobs, readable times."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.integration.test_cli_client import group, silo, silo_json

ROOT = Path(__file__).resolve().parents[2]


def test_readme_shell_commands_need_no_activated_venv():
    """Every command in README's quick start and Python client sections runs from a
    fresh clone as written: through scripts/ or .venv/bin/, never a bare `silo`/`python`
    that only exists inside an activated virtualenv."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start"):text.index("## What works today")]
    commands = [ln.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)
                for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    inline = re.findall(r"`((?:python3?|silo) [^`]*|(?:\.venv/bin/|scripts/)[^`]*)`", section)
    assert commands, "no shell commands found in the quick start"
    for cmd in commands + inline:
        first = cmd.split()[0]
        assert first.startswith(("scripts/", ".venv/bin/")), f"needs an activated venv: {cmd}"
        if first.startswith("scripts/"):
            assert os.access(ROOT / first, os.X_OK), f"{first} missing or not executable"


def test_scripts_silo_runs_the_cli_of_this_checkout(tmp_path):
    # With ./.venv present it only execs .venv/bin/silo; a fake venv shows the hand-off
    # without installing anything.
    venv_bin = tmp_path / "clone" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (tmp_path / "clone" / "scripts").mkdir()
    script = (ROOT / "scripts" / "silo").read_text()
    (tmp_path / "clone" / "scripts" / "silo").write_text(script)
    (tmp_path / "clone" / "scripts" / "silo").chmod(0o755)
    (tmp_path / "clone" / "scripts" / "venv.sh").write_text(
        (ROOT / "scripts" / "venv.sh").read_text())  # scripts/silo sources it
    (tmp_path / "clone" / "pyproject.toml").write_text("")
    (venv_bin / "silo").write_text(f"#!/bin/sh\nexec {sys.executable} -m silo \"$@\"\n")
    (venv_bin / "silo").chmod(0o755)
    os.utime(tmp_path / "clone" / "pyproject.toml", (1, 1))
    (tmp_path / "clone" / ".venv" / ".installed").write_text("")
    p = subprocess.run([str(tmp_path / "clone" / "scripts" / "silo"), "tenant", "hash", "x"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "5c80c09683041123"


def test_output_into_a_closed_pipe_exits_quietly(server, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"big": "x" * 400_000}))  # > a pipe buffer
    jid = silo_json("enqueue", "-g", group(), "--delay", "3600", "--payload",
                    f"@{tmp_path / 'p.json'}", server=server)["id"]
    p = subprocess.Popen([sys.executable, "-m", "silo", "job", "get", jid,
                          "--server", server.addr], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.read(10)  # like `| head -c 10`: read a little, then close the pipe
    p.stdout.close()
    err = p.stderr.read().decode()
    rc = p.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert err == "" and rc == 141


def test_json_errors_are_json(server):
    p = silo("job", "get", "no-such-job", "--json", server=server, check=False)
    assert p.returncode == 1 and p.stderr == ""
    doc = json.loads(p.stdout)
    assert doc["error"]["code"] == "NOT_FOUND" and doc["error"]["exit_code"] == 1
    assert "no-such-job" in doc["error"]["message"]
    p = silo("job", "get", "--json", server=server, check=False)  # missing ID: usage
    assert p.returncode == 2
    doc = json.loads(p.stdout)
    assert doc["error"]["code"] == "USAGE" and "id" in doc["error"]["message"]
    p = silo("enqueue", "-g", "g", "--payload", "{bad", "--json", server=server, check=False)
    assert p.returncode == 2 and json.loads(p.stdout)["error"]["code"] == "USAGE"
    p = subprocess.run([sys.executable, "-m", "silo", "cluster", "info", "--json",
                        "--server", "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and json.loads(p.stdout)["error"]["code"] == "UNREACHABLE"


def test_result_of_failed_or_cancelled_job_exits_nonzero(server, client):
    g = group()
    jid = silo_json("enqueue", "-g", g, server=server)["id"]
    [task] = client.lease(1, g)
    client.fail(task, code="BOOM")
    p = silo("job", "result", jid, server=server, check=False)
    assert p.returncode == 4 and "BOOM" in p.stdout
    p = silo("job", "result", jid, "--json", server=server, check=False)
    assert p.returncode == 4 and json.loads(p.stdout)["error_code"] == "BOOM"
    jid = silo_json("enqueue", "-g", g, "--delay", "3600", server=server)["id"]
    silo("job", "cancel", jid, server=server)
    assert silo("job", "result", jid, server=server, check=False).returncode == 5
    jid = silo_json("enqueue", "-g", g, server=server)["id"]
    [task] = client.lease(1, g)
    client.succeed(task)
    assert silo("job", "result", jid, server=server).returncode == 0


def test_times_are_readable_beside_epoch_ms(server):
    jid = silo_json("enqueue", "-g", group(), "--delay", "3600", server=server)["id"]
    text = silo("job", "get", jid, server=server).stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("enqueue_time_ms"))
    assert re.search(r"\d{13} \(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC\)", line), line
    # --json stays machine-readable: plain integers.
    assert isinstance(silo_json("job", "get", jid, server=server)["enqueue_time_ms"], int)
