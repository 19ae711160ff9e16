"""SlateDB on S3: the server keeps its shards in a real S3 API (moto's server, started
here on loopback), and acknowledged jobs survive kill -9 there too."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server

MOTO = Path(sys.executable).parent / "moto_server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    if not MOTO.exists() and shutil.which("moto_server") is None:
        pytest.skip("moto[server] is not installed")
    port = free_port()
    proc = subprocess.Popen([str(MOTO if MOTO.exists() else "moto_server"), "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        req = urllib.request.Request(f"{url}/silo-bucket", method="PUT")
        urllib.request.urlopen(req, timeout=5).read()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "PATH": os.environ.get("PATH", "")}


def test_jobs_live_in_s3_and_survive_kill_9(tmp_path, s3_endpoint):
    args = ("--object-store-url", "s3://silo-bucket/it", "--shards", "2")
    env = s3_env(s3_endpoint)
    srv = Server(tmp_path / "d", *args, env=env)
    with srv:
        c = srv.client()
        ids = [c.enqueue(task_group="s3", payload=bytes([i])) for i in range(50)]
        srv.kill()
        c.channel.close()
    assert not (tmp_path / "d" / "objects").exists()  # nothing on local disk
    listing = urllib.request.urlopen(f"{s3_endpoint}/silo-bucket?list-type=2&prefix=it/shards/",
                                     timeout=5).read().decode()
    assert "it/shards/" in listing
    with Server(tmp_path / "d", *args, env=env) as srv2:
        c2 = srv2.client()
        for i, jid in enumerate(ids):
            assert c2.get(jid).payload.msgpack == bytes([i])
        assert len(c2.lease(100, "s3")) == 50
        assert c2.stub.GetNodeInfo(pb.GetNodeInfoRequest()).owned_shards
        c2.channel.close()
