"""bench/rss_parts.py runs end to end on a tiny fill and prints every phase's memory line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_rss_parts_prints_each_phase(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "rss_parts.py"), "--jobs", "2000", "--samples", "1",
         "--settle", "0", "--dir", str(tmp_path), "--show", "slatedb.db.l0_sst_count"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    tags = [line.split("]")[0].lstrip("[") for line in out.splitlines() if line.startswith("[")]
    assert tags[0] == "1k" and tags[-3:] == ["filled+trim", "settled+trim", "closed+trim"]
    assert "malloc sys=" in out and "pyblocks=" in out and "l0_sst_count=" in out
