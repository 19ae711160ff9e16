"""Tenant rules with tenancy on (behaviour.md §1.1): required, ≤ 64 chars, in range."""

from __future__ import annotations

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from tests.integration.harness import hash_tenant


def test_tenants_route_to_their_shard_and_are_echoed(tenant_client):
    c = tenant_client
    for tenant in ("tenant-a", "test-tenant", "ünï", "x" * 64):
        jid = c.enqueue(tenant=tenant, task_group="tg")
        assert c.get(jid, tenant=tenant).id == jid
    tasks = c.lease(10, "tg")
    assert {t.tenant_id for t in tasks} == {"tenant-a", "test-tenant", "ünï", "x" * 64}
    for t in tasks:
        c.heartbeat(t)
        c.succeed(t)


def test_same_id_in_two_tenants_is_two_jobs(tenant_client):
    c = tenant_client
    c.enqueue(tenant="t1", id="same", task_group="tg2", payload=b"\x01")
    c.enqueue(tenant="t2", id="same", task_group="tg2", payload=b"\x02")
    assert c.get("same", tenant="t1").payload.msgpack == b"\x01"
    assert c.get("same", tenant="t2").payload.msgpack == b"\x02"


@pytest.mark.parametrize("tenant,code,msg", [
    (None, "INVALID_ARGUMENT", "tenant id required"),
    ("", "INVALID_ARGUMENT", "tenant id required"),
    ("x" * 65, "INVALID_ARGUMENT", "invalid tenant id"),
])
def test_tenant_validation(tenant_client, tenant, code, msg):
    c = tenant_client
    req = pb.EnqueueRequest(shard=c.owners[0].shard_id, task_group="tg")
    if tenant is not None:
        req.tenant = tenant
    with pytest.raises(grpc.RpcError) as e:
        c.stub.Enqueue(req)
    assert (e.value.code().name, e.value.details()) == (code, msg)


def test_tenant_outside_the_shard_range_is_refused(tenant_client):
    c = tenant_client
    right = c.shard_for("acme")
    wrong = next(o for o in c.owners if o.shard_id != right)
    with pytest.raises(grpc.RpcError) as e:
        c.stub.Enqueue(pb.EnqueueRequest(shard=wrong.shard_id, tenant="acme", task_group="tg"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.details() == (
        f"tenant 'acme' is not within shard {wrong.shard_id} range "
        f"[{wrong.range_start}, {wrong.range_end}); refresh topology and retry")
    assert hash_tenant("acme")  # the client-side hash is what routed `right`


def test_worker_rpcs_need_tenant_id_when_tenancy_is_on(tenant_client):
    c = tenant_client
    c.enqueue(tenant="w-tenant", task_group="tg3")
    [t] = c.lease(1, "tg3")
    with pytest.raises(grpc.RpcError) as e:
        c.stub.Heartbeat(pb.HeartbeatRequest(shard=t.shard, worker_id="w", task_id=t.id))
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tenant_id is required for worker operations when tenancy is enabled")
    c.succeed(t)


def test_reset_shards_needs_dev_mode(tenant_client):
    with pytest.raises(grpc.RpcError) as e:
        tenant_client.stub.ResetShards(pb.ResetShardsRequest())
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.PERMISSION_DENIED, "ResetShards is only available in dev mode")


def test_reference_hashes():
    assert hash_tenant("-") == "7a162ebe4ce6fc55"
    assert hash_tenant("test-tenant") == "7bda10a719882c53"
    assert hash_tenant("tenant-a") == "24cbcbec76c2694a"
    assert hash_tenant("") == "ef46db3751d8e999"
    assert hash_tenant("ünï") == "0de04b65318f8bc9"
