from __future__ import annotations

import pytest

from tests.integration.harness import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for a module: tenancy off, dev mode on, short reaper interval."""
    with Server(tmp_path_factory.mktemp("data"), "--dev-mode", "--reaper-interval-ms", "100",
                "--lease-ms", "1000") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = server.client()
    yield c
    c.channel.close()


@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("tdata"), "--tenancy", "--shards", "4") as s:
        yield s


@pytest.fixture(scope="module")
def tenant_client(tenant_server):
    c = tenant_server.client()
    yield c
    c.channel.close()
