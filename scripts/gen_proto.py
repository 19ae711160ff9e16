#!/usr/bin/env python3
"""Regenerate the Python gRPC bindings for proto/silo.proto.

Writes silo_pb2.py, silo_pb2.pyi and silo_pb2_grpc.py into silo/_proto (or the
directory given with --out) using grpc_tools.protoc from the current interpreter,
then makes the import inside silo_pb2_grpc.py package-relative so the bindings
work as the package ``silo._proto``.

Usage:
    python scripts/gen_proto.py [--out DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO_FILE = PROTO_DIR / "silo.proto"
DEFAULT_OUT = ROOT / "silo" / "_proto"

GENERATED = ("silo_pb2.py", "silo_pb2.pyi", "silo_pb2_grpc.py")

# protoc emits a top-level import of the sibling module; rewrite it to a relative one.
_ABSOLUTE_IMPORT = re.compile(r"^import silo_pb2 as silo__pb2$", re.MULTILINE)
_RELATIVE_IMPORT = "from . import silo_pb2 as silo__pb2"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` and fix up imports; return the generated paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Relative paths keep absolute checkout locations out of the generated files.
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE.name,
    ]
    subprocess.run(cmd, cwd=PROTO_DIR, check=True)

    grpc_file = out_dir / "silo_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed, count = _ABSOLUTE_IMPORT.subn(_RELATIVE_IMPORT, text)
    if count != 1:
        raise SystemExit(
            f"expected one 'import silo_pb2 as silo__pb2' in {grpc_file}, found {count}"
        )
    grpc_file.write_text(fixed)
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
