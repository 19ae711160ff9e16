"""The streaming extension's proto: its own package and service, bindings up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN_SCRIPT = ROOT / "scripts" / "gen_proto.py"
PROTO_PKG = ROOT / "silo" / "_proto"
GENERATED = ("silo_stream_pb2.py", "silo_stream_pb2.pyi", "silo_stream_pb2_grpc.py")


def test_stream_bindings_are_up_to_date(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, f"gen_proto.py failed:\n{res.stdout}\n{res.stderr}"
    stale = [n for n in GENERATED if (tmp_path / n).read_bytes() != (PROTO_PKG / n).read_bytes()]
    assert not stale, (f"silo/_proto is out of date with proto/silo_stream.proto "
                       f"({', '.join(stale)}); run: python scripts/gen_proto.py")


def test_the_extension_is_its_own_package_and_service() -> None:
    from silo._proto import silo_pb2, silo_stream_pb2

    svc = silo_stream_pb2.DESCRIPTOR.services_by_name["SiloStream"]
    assert svc.full_name == "silostream.v1.SiloStream"
    assert set(svc.methods_by_name) == {"EnqueueMany", "Work"}
    work = svc.methods_by_name["Work"]
    assert work.client_streaming and work.server_streaming
    # silo.v1 is untouched: the extension only imports its messages.
    assert "SiloStream" not in silo_pb2.DESCRIPTOR.services_by_name
