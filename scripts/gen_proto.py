#!/usr/bin/env python3
"""Regenerate the Python gRPC bindings of every proto in proto/.

For each of proto/silo.proto (silo.v1), proto/silo_stream.proto (the streaming extension)
and proto/silo_query_ext.proto (the SQL extension) writes <name>_pb2.py, <name>_pb2.pyi
and <name>_pb2_grpc.py into silo/_proto (or the directory given with --out) using
grpc_tools.protoc from the current interpreter, then makes the generated imports of these
modules package-relative so the bindings work as the package ``silo._proto``.

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
DEFAULT_OUT = ROOT / "silo" / "_proto"

# silo.v1 first: the extensions import its messages.
PROTOS = ("silo.proto", "silo_stream.proto", "silo_query_ext.proto")
_MODULES = "|".join(re.escape(Path(p).stem + "_pb2") for p in PROTOS)

# protoc emits top-level imports of sibling modules; rewrite them to relative ones.
_ABSOLUTE_IMPORT = re.compile(rf"^import ({_MODULES}) as (\w+)$", re.MULTILINE)
_ABSOLUTE_FROM = re.compile(rf"^from ({_MODULES}) import", re.MULTILINE)


def generated_names(proto: str) -> tuple[str, str, str]:
    """The three files protoc writes for ``proto`` (a file name in proto/)."""
    stem = Path(proto).stem
    return (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py")


def make_relative(text: str) -> str:
    """``import silo_pb2 as x`` → ``from . import silo_pb2 as x`` (and ``from silo_pb2 import``)."""
    text = _ABSOLUTE_IMPORT.sub(r"from . import \1 as \2", text)
    return _ABSOLUTE_FROM.sub(r"from .\1 import", text)


def generate(out_dir: Path, proto: str) -> list[Path]:
    """Run protoc on ``proto`` into ``out_dir`` and fix up imports; the generated paths."""
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
        proto,
    ]
    subprocess.run(cmd, cwd=PROTO_DIR, check=True)
    paths = [out_dir / name for name in generated_names(proto)]
    for path in paths:
        path.write_text(make_relative(path.read_text()))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output directory (default: {DEFAULT_OUT.relative_to(ROOT)})",
    )
    args = parser.parse_args(argv)
    for proto in PROTOS:
        for path in generate(args.out.resolve(), proto):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
