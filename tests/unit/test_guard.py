"""The rpc guard: token comparison, bounded messages, throttled log lines."""

from __future__ import annotations

import logging

import grpc
import pytest

from silo import errors
from silo._proto import silo_pb2 as pb
from silo.errors import SiloError
from silo.rpc import guard, service


class Ctx:
    def __init__(self, md):
        self.md = md

    def invocation_metadata(self):
        return self.md


def test_token_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = service.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(service.hmac, "compare_digest", spy)
    svc = service.SiloService.__new__(service.SiloService)
    svc.auth_token = "s3cret"
    svc.check_auth(Ctx((("authorization", "Bearer s3cret"),)))
    with pytest.raises(SiloError) as e:
        svc.check_auth(Ctx((("authorization", "Bearer s3creT"),)))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert calls == [(b"Bearer s3cret", b"Bearer s3cret"), (b"Bearer s3creT", b"Bearer s3cret")]


def test_clip_bounds_echoed_values():
    assert errors.clip("abc") == "abc"
    assert errors.clip("x" * 1000) == "x" * 128 + "…"
    assert len(guard.bounded("y" * 10**6)) == errors.MAX_MESSAGE_CHARS + 1
    assert len(errors.job_already_exists("j" * 10**6).message) < 200
    assert len(errors.cannot("lease", "j" * 10**6, "r", "Running").message) < 250


def test_undecodable_body_is_invalid_argument_and_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="silo.rpc.guard")
    for _ in range(50):
        with pytest.raises(SiloError) as e:
            guard.parse_request(pb.EnqueueRequest, "Enqueue", b"\xff\xff\xff")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.message == "request body is not a valid silo.v1.EnqueueRequest message"
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) <= 1
    m = guard.parse_request(pb.GetJobRequest, "GetJob", pb.GetJobRequest(id="a").SerializeToString())
    assert m.id == "a"


def test_throttle_reports_how_many_it_stands_for(caplog):
    caplog.set_level(logging.INFO)
    t = guard.LogThrottle(logging.getLogger("t"), logging.INFO, 3600)
    for _ in range(5):
        t("event %s", "x")
    assert [r.getMessage() for r in caplog.records] == [
        "event x (1 such since the last report)"]
