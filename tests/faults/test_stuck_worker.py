"""A stuck worker (SIGSTOP) under mixed load: the node keeps serving through the healthy
process, calls that need the stopped one fail within their deadline, nothing acked is lost.

Two variants: the worker is resumed (SIGCONT) after ~8 s, before the supervisor's liveness
check gives up on it; or it stays stopped until the supervisor kills and replaces it.

Connections to the public port are spread over the processes by the kernel (SO_REUSEPORT),
so a probe connection may itself land on the stopped process: such a connection can only
time out. Each probe connection is classified during the stop by a locally served call
(GetClusterInfo); the ones on the healthy process must serve every call for its shards."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time

import grpc
import pytest

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from tests.faults.load import GROUP, TERMINAL, MixedLoad, job_statuses
from tests.faults.test_chaos import _drain, _start_time, report, workers
from tests.integration.harness import CHANNEL_OPTIONS, Server, tenants_covering_all_shards

pytestmark = pytest.mark.slow

DEADLINE_S = 3.0
SLACK_S = 1.5  # scheduling noise on a loaded 2-core machine, never a hang
PROBES = 12


class Probe:
    """One connection; per round: is it on a live process, and what do calls to a shard of
    the healthy and of the stopped process answer, and how fast."""

    def __init__(self, addr: str, i: int) -> None:
        self.channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS + [
            ("grpc.use_local_subchannel_pool", 1), ("silo.test.probe", i)])
        self.stub = pb_grpc.SiloStub(self.channel)
        self.live_rounds = 0
        self.dead_rounds = 0
        # target ("healthy"/"stopped") → Counter of code names; and the slowest answer
        self.codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.slowest = 0.0
        self.acked: dict[str, str] = {}

    async def _call(self, target: str, shard: str, tenant: str) -> None:
        t0 = time.monotonic()
        try:
            r = await self.stub.Enqueue(pb.EnqueueRequest(
                shard=shard, tenant=tenant, task_group=GROUP,
                payload=pb.SerializedBytes(msgpack=b"\x80")), timeout=DEADLINE_S)
            self.acked[r.id] = tenant
            self.codes[target]["OK"] += 1
        except grpc.aio.AioRpcError as e:
            self.codes[target][e.code().name] += 1
        self.slowest = max(self.slowest, time.monotonic() - t0)

    async def round(self, healthy: tuple[str, str], stopped: tuple[str, str]) -> bool:
        """One probe round; returns whether this connection is served by a live process."""
        async def local() -> bool:
            t0 = time.monotonic()
            try:
                await self.stub.GetClusterInfo(pb.GetClusterInfoRequest(), timeout=DEADLINE_S)
                return True
            except grpc.aio.AioRpcError:
                return False
            finally:
                self.slowest = max(self.slowest, time.monotonic() - t0)

        live, _, _ = await asyncio.gather(
            local(), self._call("healthy", *healthy), self._call("stopped", *stopped))
        if live:
            self.live_rounds += 1
        else:
            self.dead_rounds += 1
        return live


def _shards_by_process(c, n: int) -> dict[int, list[str]]:
    """Shard ids of each worker index (the supervisor deals sorted shards round-robin)."""
    out: dict[int, list[str]] = collections.defaultdict(list)
    for i, o in enumerate(c.owners):
        out[i % n].append(o.shard_id)
    return out


@pytest.mark.parametrize("variant", ["resumed", "replaced"])
def test_sigstop_one_worker_under_mixed_load(tmp_path, variant):
    liveness = (["--liveness-interval-ms", "500", "--liveness-misses", "6"]
                if variant == "replaced" else ["--liveness-misses", "60"])
    with Server(tmp_path / "d", "--processes", "2", "--tenancy", "--shards", "8",
                "--reaper-interval-ms", "200", *liveness) as srv:
        c = srv.client()
        tenants = tenants_covering_all_shards(c)
        pids = sorted(workers(srv), key=lambda p: (_start_time(p), p))
        assert len(pids) == 2
        victim_index = 1
        victim = pids[victim_index]
        by_proc = _shards_by_process(c, 2)
        by_shard = collections.defaultdict(list)
        for t in tenants:
            by_shard[c.shard_for(t)].append(t)
        healthy_t = next(t for s in by_proc[0] for t in by_shard[s])
        stopped_t = next(t for s in by_proc[victim_index] for t in by_shard[s])
        healthy = (c.shard_for(healthy_t), healthy_t)
        stopped = (c.shard_for(stopped_t), stopped_t)

        async def scenario():
            load = MixedLoad(srv.addr, c.shard_for, tenants)
            probes = [Probe(srv.addr, i) for i in range(PROBES)]
            await load.start()
            await asyncio.sleep(3)
            os.kill(victim, signal.SIGSTOP)
            t_stop = time.monotonic()
            replaced_after = None
            try:
                while True:
                    await asyncio.gather(*(p.round(healthy, stopped) for p in probes))
                    elapsed = time.monotonic() - t_stop
                    if variant == "resumed" and elapsed >= 8:
                        break
                    if variant == "replaced":
                        now = workers(srv)
                        if victim not in now and len(now) == 2:
                            replaced_after = elapsed
                            break
                        if elapsed > 60:
                            break
                    await asyncio.sleep(0.25)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGCONT)
            stopped_s = time.monotonic() - t_stop
            # Back to normal: a call for the stopped process's shard succeeds again.
            t_back = time.monotonic()
            back_s = None
            while time.monotonic() - t_back < 60:
                before = sum(p.codes["stopped"]["OK"] for p in probes)
                await probes[0].round(healthy, stopped)
                if sum(p.codes["stopped"]["OK"] for p in probes) > before:
                    back_s = time.monotonic() - t_back
                    break
                await asyncio.sleep(0.5)
            for p in probes:  # the load's consumers run the probes' jobs too
                load.stats.acked.update(p.acked)
            drain_s = await _drain(load, 45, idle=12)
            await load.stop()
            for p in probes:
                await p.channel.close()
            return load.stats, probes, stopped_s, replaced_after, back_s, drain_s

        stats, probes, stopped_s, replaced_after, back_s, drain_s = asyncio.run(scenario())
        assert srv.proc.poll() is None, "the server exited:\n" + "".join(srv.log[-40:])
        live = [p for p in probes if p.dead_rounds == 0]
        acked = stats.acked
        statuses = job_statuses(c.stub, acked, c.shard_for)
        on_live = collections.Counter()
        for p in live:
            for target, codes in p.codes.items():
                for code, k in codes.items():
                    on_live[f"{target}:{code}"] += k
        report(f"stuck_worker_{variant}", stopped_s=round(stopped_s, 1),
               replaced_after_s=replaced_after and round(replaced_after, 1),
               back_after_s=back_s and round(back_s, 2), probes=PROBES,
               probes_on_live_process=len(live), probe_codes_via_live=dict(on_live),
               slowest_probe_s=round(max(p.slowest for p in probes), 2),
               deadline_s=DEADLINE_S, acked=len(acked), lost=statuses["LOST"],
               statuses=dict(statuses), load_errors=dict(stats.errors),
               ok_calls=stats.ok_calls, max_gap_without_success_s=round(stats.max_gap_s, 2),
               drain_s=round(drain_s, 1))
        assert live, "no probe connection landed on the healthy process"
        # The healthy process serves its own shards throughout the stop ...
        for p in live:
            assert set(p.codes["healthy"]) == {"OK"}, p.codes
            # ... and answers for the stopped one's shards with a clear error.
            assert set(p.codes["stopped"]) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, \
                p.codes
        # No call hangs past its deadline, on whichever process its connection landed.
        assert max(p.slowest for p in probes) < DEADLINE_S + SLACK_S
        assert stats.max_gap_s < 10, "the node stopped serving"
        assert back_s is not None, "the stopped process's shards never came back"
        if variant == "replaced":
            assert replaced_after is not None, "the supervisor never replaced the worker"
        else:
            assert victim in workers(srv), "the resumed worker was replaced"
        assert statuses["LOST"] == 0 and statuses["UNREADABLE"] == 0
        assert sum(statuses[s] for s in TERMINAL) == len(acked), statuses
        c.channel.close()
