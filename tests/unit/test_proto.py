"""proto/silo.proto: wire contract, generated bindings in sync, bindings usable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "silo.proto"
GEN_SCRIPT = ROOT / "scripts" / "gen_proto.py"
PROTO_PKG = ROOT / "silo" / "_proto"
GENERATED = ("silo_pb2.py", "silo_pb2.pyi", "silo_pb2_grpc.py",
             # scripts/gen_proto.py also writes the SQL extension's bindings (the streaming
             # extension's are checked in test_stream_proto.py).
             "silo_query_ext_pb2.py", "silo_query_ext_pb2.pyi", "silo_query_ext_pb2_grpc.py")

# The shared wire-contract checker lives outside the project; tests skip without it.
SHARED = ROOT.parent / "shared"
CHECK_WIRE = SHARED / "tools" / "check_wire.py"
CONTRACT = SHARED / "spec" / "silo-v1-wire.json"

# Every method of silo.v1.Silo, with (server_streaming, client_streaming).
EXPECTED_METHODS = {
    "CancelJob": (False, False),
    "CompactShard": (False, False),
    "ConfigureShard": (False, False),
    "CpuProfile": (False, False),
    "DeleteJob": (False, False),
    "DropTenantHolders": (False, False),
    "DumpTasks": (False, False),
    "Enqueue": (False, False),
    "ExpediteJob": (False, False),
    "FlushShard": (False, False),
    "ForceReleaseShard": (False, False),
    "GetClusterInfo": (False, False),
    "GetJob": (False, False),
    "GetJobResult": (False, False),
    "GetNodeInfo": (False, False),
    "GetShardStorageInfo": (False, False),
    "GetSplitStatus": (False, False),
    "HeapProfile": (False, False),
    "Heartbeat": (False, False),
    "ImportJobs": (False, False),
    "LeaseTask": (False, False),
    "LeaseTasks": (False, False),
    "Query": (False, False),
    "QueryArrow": (True, False),
    "ReportOutcome": (False, False),
    "ReportRefreshOutcome": (False, False),
    "RequestSplit": (False, False),
    "ResetShards": (False, False),
    "RestartJob": (False, False),
}


def test_proto_matches_wire_contract() -> None:
    if not CHECK_WIRE.is_file():
        pytest.skip(f"wire checker not available at {CHECK_WIRE}")
    res = subprocess.run(
        [sys.executable, str(CHECK_WIRE), str(PROTO)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"check_wire.py failed:\n{res.stdout}\n{res.stderr}"


def test_expected_methods_match_contract() -> None:
    if not CONTRACT.is_file():
        pytest.skip(f"wire contract not available at {CONTRACT}")
    service = json.loads(CONTRACT.read_text())["services"]["Silo"]
    contract = {
        name: (spec["server_streaming"], spec["client_streaming"]) for name, spec in service.items()
    }
    assert contract == EXPECTED_METHODS


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(GEN_SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, f"gen_proto.py failed:\n{res.stdout}\n{res.stderr}"
    stale = [
        name
        for name in GENERATED
        if (tmp_path / name).read_bytes() != (PROTO_PKG / name).read_bytes()
    ]
    assert not stale, (
        f"silo/_proto is out of date with proto/ ({', '.join(stale)}); "
        "run: python scripts/gen_proto.py"
    )


def test_bindings_import_and_expose_service() -> None:
    from silo._proto import silo_pb2, silo_pb2_grpc

    service = silo_pb2.DESCRIPTOR.services_by_name["Silo"]
    assert service.full_name == "silo.v1.Silo"
    got = {m.name: (m.server_streaming, m.client_streaming) for m in service.methods}
    assert got == EXPECTED_METHODS

    for name in EXPECTED_METHODS:
        assert callable(getattr(silo_pb2_grpc.SiloServicer, name, None)), name
    assert callable(silo_pb2_grpc.SiloStub)
    assert callable(silo_pb2_grpc.add_SiloServicer_to_server)


def test_proto3_optional_presence() -> None:
    from silo._proto import silo_pb2

    assert silo_pb2.EnqueueRequest(tenant="x").HasField("tenant")
    assert not silo_pb2.EnqueueRequest().HasField("tenant")
    # An explicitly set empty string is still "present" on the wire.
    assert silo_pb2.EnqueueRequest(tenant="").HasField("tenant")
    assert not silo_pb2.EnqueueRequest(shard="s").HasField("retry_policy")
    assert silo_pb2.LeaseTasksRequest(shard="s").HasField("shard")


def test_oneofs_maps_and_odd_numbers() -> None:
    from silo._proto import silo_pb2

    out = silo_pb2.ReportOutcomeRequest(cancelled=silo_pb2.Cancelled())
    assert out.WhichOneof("outcome") == "cancelled"
    assert silo_pb2.ReportOutcomeRequest.DESCRIPTOR.fields_by_name["cancelled"].number == 6

    payload = silo_pb2.SerializedBytes(msgpack=b"\x90")
    assert payload.WhichOneof("encoding") == "msgpack"

    req = silo_pb2.EnqueueRequest(metadata={"a": "1"})
    assert dict(req.metadata) == {"a": "1"}

    tenant = silo_pb2.ConfigureShardRequest.DESCRIPTOR.fields_by_name["tenant"]
    assert tenant.number == 100

    # Round trip through the wire format.
    msg = silo_pb2.Limit(
        rate_limit=silo_pb2.GubernatorRateLimit(name="r", limit=5, duration_ms=1000)
    )
    again = silo_pb2.Limit.FromString(msg.SerializeToString())
    assert again == msg
    assert again.WhichOneof("limit") == "rate_limit"
