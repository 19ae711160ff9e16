#!/usr/bin/env python3
"""Regenerate silo/_proto/silo_query_ext_pb2*.py from proto/silo_query_ext.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "silo" / "_proto"
NAMES = ("silo_query_ext_pb2.py", "silo_query_ext_pb2.pyi", "silo_query_ext_pb2_grpc.py")


def main() -> int:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={OUT}",
                    f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", "silo_query_ext.proto"],
                   cwd=ROOT / "proto", check=True)
    for name in NAMES:
        p = OUT / name
        text = p.read_text()
        text = text.replace("import silo_pb2 as silo__pb2", "from . import silo_pb2 as silo__pb2")
        text = text.replace("import silo_query_ext_pb2 as", "from . import silo_query_ext_pb2 as")
        p.write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
