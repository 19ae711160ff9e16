"""`silo serve` as an operator meets it: start-up line, bad config, exclusivity, keepalive."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.integration.harness import Server


def test_startup_line_names_address_data_dir_shards_tenancy(tmp_path):
    with Server(tmp_path / "d", "--shards", "3", "--tenancy") as srv:
        line = next(x for x in srv.log if "silo serving on" in x)
        assert srv.addr in line and str(tmp_path / "d") in line
        assert "shards=3" in line and "tenancy=on" in line
        assert (tmp_path / "d" / "shardmap.json").exists()


def test_new_data_dir_gets_one_shard_per_process_and_keeps_its_count(tmp_path):
    env = {"SILO_SHARDS": "0"}  # the server's default (the harness pins 8 otherwise)
    with Server(tmp_path / "d", "--processes", "3", env=env) as srv, \
            grpc.insecure_channel(srv.addr) as ch:
        info = pb_grpc.SiloStub(ch).GetClusterInfo(pb.GetClusterInfoRequest(), timeout=5)
        assert info.num_shards == 3
        assert sorted({o.grpc_addr for o in info.shard_owners}) == [srv.addr]
    # Fewer processes later: the shard map is kept, and no warning about a count not asked for.
    with Server(tmp_path / "d", "--processes", "2", env=env) as srv:
        line = next(x for x in srv.log if "silo serving on" in x)
        assert "shards=3" in line and "processes=2" in line
        assert not any("ignoring shards" in x for x in srv.log)


def test_bad_config_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "silo", "serve", "--shards", "zero",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "shards" in lines[0]


def test_second_server_on_same_data_dir_is_refused(tmp_path):
    with Server(tmp_path / "d"):
        r = subprocess.run([sys.executable, "-m", "silo", "serve", "--data-dir",
                            str(tmp_path / "d"), "--grpc-addr", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "in use" in r.stderr


def test_second_server_on_same_port_is_refused(tmp_path):
    with Server(tmp_path / "a") as srv:
        r = subprocess.run([sys.executable, "-m", "silo", "serve", "--data-dir",
                            str(tmp_path / "b"), "--grpc-addr", srv.addr],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "cannot listen" in r.stderr


def test_idle_client_pinging_every_5s_is_not_sent_away(tmp_path):
    """Silo clients ping every 5 s with no call in flight; the channel must stay up."""
    opts = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]
    with Server(tmp_path / "d") as srv, grpc.insecure_channel(srv.addr, options=opts) as ch:
        stub = pb_grpc.SiloStub(ch)
        stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=5)
        time.sleep(26)
        assert ch._channel.check_connectivity_state(False) == 2  # READY: no GOAWAY, no reconnect
        stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=5)
        assert not any("too_many_pings" in x for x in srv.log)


def test_auth_token_is_required_when_set(tmp_path):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with Server(tmp_path / "d", "--auth-token", "s3cret") as srv, \
            grpc.insecure_channel(srv.addr) as ch:
        stub = pb_grpc.SiloStub(ch)
        for md, msg in ((None, "missing authorization header"),
                        ((("authorization", "Bearer nope"),), "invalid auth token")):
            try:
                stub.GetClusterInfo(pb.GetClusterInfoRequest(), metadata=md, timeout=5)
                raise AssertionError("expected UNAUTHENTICATED")
            except grpc.RpcError as e:
                assert (e.code(), e.details()) == (grpc.StatusCode.UNAUTHENTICATED, msg)
        ok = stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=5,
                                 metadata=(("authorization", "Bearer s3cret"),))
        assert ok.num_shards == 8
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert h.status == health_pb2.HealthCheckResponse.SERVING  # health bypasses auth
