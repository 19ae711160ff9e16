"""The web UI's pure rules (sessions, CSRF tokens, origins, payload decoding, TOML) and
its in-process backend against a stand-in service."""

from __future__ import annotations

import asyncio
import json
import tomllib

import grpc
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from silo import errors
from silo.config import OPTIONS, Config
from silo.rpc.service import SiloService, rpc
from silo.web import security
from silo.web.backend import Backend, BackendError
from silo.web.pages_auth import _safe_next
from silo.web.view import decode_msgpack, fmt_duration, fmt_ms, to_toml

SECRET = b"k" * 32


def test_no_auth_token_means_everyone_is_in():
    assert security.authenticated(SECRET, "", None, None)


def test_session_cookie_and_bearer_header():
    good = security.session_value(SECRET, "tok")
    assert security.authenticated(SECRET, "tok", good, None)
    assert not security.authenticated(SECRET, "tok", "x" * 64, None)
    assert not security.authenticated(b"other" * 8, "tok", good, None)  # restart: new secret
    assert not security.authenticated(SECRET, "new", good, None)  # token changed
    assert security.authenticated(SECRET, "tok", None, "Bearer tok")
    assert not security.authenticated(SECRET, "tok", None, "Bearer tok2")
    assert not security.authenticated(SECRET, "tok", None, "Basic dG9r")


def test_csrf_token_is_bound_to_the_browser_cookie():
    a, b = security.new_nonce(), security.new_nonce()
    assert a != b
    assert security.csrf_ok(SECRET, a, security.csrf_token(SECRET, a))
    assert not security.csrf_ok(SECRET, b, security.csrf_token(SECRET, a))
    assert not security.csrf_ok(SECRET, None, security.csrf_token(SECRET, a))
    assert not security.csrf_ok(SECRET, a, None)
    assert security.csrf_token(SECRET, a) != security.session_value(SECRET, a)  # purposes differ


def test_same_origin():
    assert security.same_origin(None, "h:1")
    assert security.same_origin("http://h:1", "h:1")
    assert not security.same_origin("http://evil:1", "h:1")
    assert not security.same_origin("null", "h:1")
    assert not security.same_origin("http://h:1", None)


def test_login_redirect_stays_on_this_site():
    assert _safe_next("/job?id=1") == "/job?id=1"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil", "javascript:x", ""):
        assert _safe_next(bad) == "/"


json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(json_like)
def test_msgpack_payloads_become_the_same_json(value):
    text, ok = decode_msgpack(msgspec.msgpack.encode(value))
    assert ok
    if value is not None:
        assert json.loads(text) == value


@given(st.binary(max_size=200))
def test_any_bytes_render_without_raising(data):
    text, _ = decode_msgpack(data)
    assert isinstance(text, str)


def test_binary_and_empty_values():
    assert decode_msgpack(b"") == ("", True)
    text, ok = decode_msgpack(msgspec.msgpack.encode({"b": b"\xff\x00"}))
    assert ok and json.loads(text) == {"b": {"$bytes_base64": "/wA="}}
    text, ok = decode_msgpack(b"\xc1")  # never valid msgpack
    assert not ok and "c1" in text


def test_times():
    assert fmt_ms(0) == "" and fmt_ms(1_700_000_000_123) == "2023-11-14 22:13:20.123"
    assert fmt_duration(5) == "5 ms" and fmt_duration(1500) == "1.5 s"
    assert fmt_duration(61_000) == "1 min 1 s" and fmt_duration(3_660_000) == "1 h 1 min"


def test_config_toml_round_trips_and_redacts():
    cfg = Config(auth_token="s3cret", shards=4)
    text = to_toml(cfg.redacted(), {o.name: o.toml for o in OPTIONS})
    doc = tomllib.loads(text)
    assert doc["server"]["auth_token"] == "<redacted>" and "s3cret" not in text
    assert doc["shards"]["count"] == 4 and doc["webui"]["addr"] == "127.0.0.1:8080"


# ---- the in-process backend: the same rpc wrapper as a network call ------------------


class _FakeService(SiloService):
    def __init__(self) -> None:  # no node: these handlers never touch one
        self.auth_token = "t"
        self.node = None
        self.seen: list[str] = []

    @rpc
    async def GetJob(self, request, context):
        self.seen.append(request.id)
        raise errors.job_not_found()

    @rpc
    async def CancelJob(self, request, context):
        await asyncio.sleep(30)


def test_backend_calls_go_through_the_rpc_wrapper_with_the_token():
    svc = _FakeService()
    with pytest.raises(BackendError) as e:
        asyncio.run(Backend(svc).get_job("s", "j1", None))
    assert svc.seen == ["j1"]  # the auth check passed: the web UI carries the token
    assert (e.value.code, e.value.message, e.value.http_status) == (
        grpc.StatusCode.NOT_FOUND, "job not found", 404)


def test_backend_without_the_token_is_refused_by_the_service():
    svc = _FakeService()
    backend = Backend(svc)
    backend._metadata = ()
    with pytest.raises(BackendError) as e:
        asyncio.run(backend.get_job("s", "j1", None))
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and svc.seen == []


def test_backend_call_has_a_deadline():
    with pytest.raises(BackendError) as e:
        asyncio.run(Backend(_FakeService(), timeout_s=0.05).job_action("cancel", "s", "j",
                                                                        None))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and e.value.http_status == 504
