#!/usr/bin/env python3
"""Regenerate the Python bindings of the streaming extension, proto/silo_stream.proto.

Writes silo_stream_pb2.py, silo_stream_pb2.pyi and silo_stream_pb2_grpc.py into
silo/_proto (or --out) with grpc_tools.protoc, and makes their imports of silo_pb2 and of
each other package-relative. Kept apart from scripts/gen_proto.py, which owns silo.v1.

Usage:
    python scripts/gen_stream_proto.py [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILE = PROTO_DIR / "silo_stream.proto"
DEFAULT_OUT = ROOT / "silo" / "_proto"

GENERATED = ("silo_stream_pb2.py", "silo_stream_pb2.pyi", "silo_stream_pb2_grpc.py")

_ABSOLUTE_IMPORT = re.compile(r"^import (silo_pb2|silo_stream_pb2) as (\w+)$", re.MULTILINE)
_ABSOLUTE_FROM = re.compile(r"^from silo_pb2 import", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={out_dir}",
           f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO_FILE.name]
    subprocess.run(cmd, cwd=PROTO_DIR, check=True)
    paths = [out_dir / name for name in GENERATED]
    for path in paths:
        text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", path.read_text())
        path.write_text(_ABSOLUTE_FROM.sub("from .silo_pb2 import", text))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
