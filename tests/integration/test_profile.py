"""scripts/profile.sh writes one py-spy profile per worker process of a live server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import Server

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None,
                    reason="py-spy is not installed next to this python")
def test_profile_script_writes_one_file_per_worker(tmp_path):
    with Server(tmp_path / "d", "--processes", "2") as srv:
        out = tmp_path / "prof"
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
               "PYSPY": str(Path(sys.executable).parent / "py-spy")}
        r = subprocess.run([str(ROOT / "scripts/profile.sh"), "2", str(out), str(srv.proc.pid)],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        files = sorted(out.glob("*.speedscope.json"))
        assert len(files) == 2
        for f in files:
            assert "shared" in json.loads(f.read_text())
