"""The web UI over HTTP against the real server (2 worker processes, so pages reach
shards of the other process through the forwarding path): every route, 404 and bad
parameters, escaping, CSRF refusal, auth on and off, and each job action."""

from __future__ import annotations

import html
import time
import uuid

import msgspec
import pytest

from silo._proto import silo_pb2 as pb
from tests.integration.harness import Server
from tests.integration.web_client import WebClient

EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("web") / "d", "--processes", "2") as s:
        yield s


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("websec") / "d", "--processes", "2", "--tenancy",
                "--auth-token", "s3cret") as s:
        yield s


def web(s: Server, **kw) -> WebClient:
    assert s.web_addr, "the start-up line names the web UI address"
    return WebClient(s.web_addr, **kw)


def job_path(c, job_id: str, tenant: str | None = None) -> str:
    path = f"/job?id={job_id}&shard={c.shard_for(tenant)}"
    return path + (f"&tenant={tenant}" if tenant else "")


def status_of(c, job_id: str, tenant: str | None = None) -> int:
    return c.get(job_id, tenant).status


def test_startup_line_names_the_web_address(srv):
    line = next(x for x in srv.log if "silo serving on" in x)
    assert f"webui=http://{srv.web_addr}" in line


def test_overview_lists_every_shard_with_its_process(srv):
    c = srv.client()
    c.enqueue(payload=msgspec.msgpack.encode({"n": 1}))
    for path in ("/", "/cluster"):
        page = web(srv).get(path)
        assert page.status == 200
        assert 'data-refresh="5"' in page.body and "/static/refresh.js" in page.body
        for o in c.owners:
            assert o.shard_id in page.body
        assert "w0" in page.body and "w1" in page.body
        assert "Unavailable" not in page.body
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_static_assets_are_local(srv):
    w = web(srv)
    for path in ("/static/style.css", "/static/refresh.js", "/static/favicon.svg"):
        assert w.get(path).status == 200
    assert "http" not in w.get("/").body.split("<body")[0].replace("http-equiv", "")


def test_unknown_page_is_a_404_page(srv):
    page = web(srv).get("/no/such/page")
    assert page.status == 404 and "Not found" in page.body and "<nav>" in page.body


@pytest.mark.parametrize("path, status", [
    ("/shard", 400),
    ("/shard?id=not-a-uuid", 400),
    (f"/shard?id={uuid.uuid4()}", 404),
    ("/job", 400),
    ("/job?id=nope", 404),
    ("/job?id=x&shard=bad", 400),
    (f"/job?id=x&shard={uuid.uuid4()}", 404),
    ("/job?id=" + "x" * 500, 400),
    ("/tenants", 404),
    ("/tenant?name=t", 404),
    ("/job/cancel", 405),
])
def test_bad_parameters_give_4xx_pages_never_tracebacks(srv, path, status):
    page = web(srv).get(path)
    assert page.status == status, page.body
    assert "Traceback" not in page.body and 'id="error-message"' in page.body


def test_shard_page_and_flush_compact(srv):
    c = srv.client()
    sid = c.owners[-1].shard_id
    w = web(srv)
    page = w.get(f"/shard?id={sid}")
    assert page.status == 200 and sid in page.body and 'id="flush"' in page.body
    done = w.post_form(f"/shard?id={sid}", f"/shard/{sid}/flush", {})
    assert done.status == 200 and f"FlushShard: flushed shard {sid}" in done.body
    done = w.post_form(f"/shard?id={sid}", f"/shard/{sid}/compact", {})
    # The server's answer either way: UNIMPLEMENTED until storage admin lands.
    assert done.status == 200 and "CompactShard" in done.body
    assert w.get(f"/shard?id={sid}").body.count("CompactShard") == 0  # shown once


def test_config_page_shows_toml(srv):
    page = web(srv).get("/config")
    assert page.status == 200
    assert "[webui]" in page.body and "processes = 2" in page.body


def test_job_page_decodes_and_escapes_user_text(srv):
    c = srv.client()
    payload = {"to": EVIL, "n": [1, 2.5, None], "raw": b"\x00\xff"}
    job_id = c.enqueue(payload=msgspec.msgpack.encode(payload), metadata={"who": EVIL},
                       task_group="escape",
                       limits=[pb.Limit(concurrency=pb.ConcurrencyLimit(key="k<b>",
                                                                       max_concurrency=3))])
    (task,) = c.lease(group="escape")
    c.fail(task, code="BOOM<i>", data=msgspec.msgpack.encode({"why": EVIL}))
    page = web(srv).get(f"/job?id={job_id}")  # no shard: found by asking the shards
    assert page.status == 200, page.body
    assert EVIL not in page.body and "<b>" not in page.body and "BOOM<i>" not in page.body
    assert html.escape(EVIL, quote=False) in page.body or "&lt;script&gt;" in page.body
    assert "&#34;n&#34;: [" in page.body or "&quot;n&quot;: [" in page.body  # pretty JSON
    assert "$bytes_base64" in page.body
    assert "BOOM&lt;i&gt;" in page.body and "failed" in page.body
    assert "max 3" in page.body and 'id="attempts"' in page.body


def test_cancel_restart_expedite_delete_change_the_job(srv):
    c = srv.client()
    w = web(srv)
    future = int(time.time() * 1000) + 3_600_000
    job_id = c.enqueue(start_at_ms=future)
    path = job_path(c, job_id)
    form = {"id": job_id, "shard": c.shard_for(None)}

    page = w.post_form(path, "/job/expedite", form)
    assert "ExpediteJob: OK" in page.body
    assert c.get(job_id).next_attempt_starts_after_ms < future

    page = w.post_form(path, "/job/cancel", form)
    assert "CancelJob: OK" in page.body and 'id="job-status">cancelled' in page.body
    assert status_of(c, job_id) == pb.JOB_STATUS_CANCELLED

    page = w.post_form(path, "/job/cancel", form)  # the server's refusal is shown
    assert "CancelJob refused: FAILED_PRECONDITION" in page.body

    page = w.post_form(path, "/job/restart", form)
    assert "RestartJob: OK" in page.body and 'id="job-status">scheduled' in page.body
    assert status_of(c, job_id) == pb.JOB_STATUS_SCHEDULED

    # Delete asks first; a POST without the confirmation only leads to the question.
    asked = w.post_form(path, "/job/delete", form)
    assert 'id="confirm-delete"' in asked.body and status_of(c, job_id) == pb.JOB_STATUS_SCHEDULED
    refused = w.post_form(path, "/job/delete", {**form, "confirm": "yes"})
    assert "DeleteJob refused" in refused.body  # not terminal
    w.post_form(path, "/job/cancel", form)
    gone = w.post_form(f"/job/delete?id={job_id}&shard={form['shard']}", "/job/delete",
                       {**form, "confirm": "yes"})
    assert gone.status == 200 and f"job {job_id} deleted" in gone.body
    assert w.get(path).status == 404


def test_unknown_action_is_404(srv):
    c = srv.client()
    job_id = c.enqueue()
    page = web(srv).post_form(job_path(c, job_id), "/job/frobnicate",
                              {"id": job_id, "shard": c.shard_for(None)})
    assert page.status == 404


def test_csrf_refusal_changes_nothing(srv):
    c = srv.client()
    job_id = c.enqueue()
    form = {"id": job_id, "shard": c.shard_for(None)}
    w = web(srv)
    page = job_path(c, job_id)
    w.get(page)  # has a CSRF cookie now
    assert w.post("/job/cancel", form).status == 403
    assert w.post("/job/cancel", {**form, "csrf": "0" * 64}).status == 403
    other = web(srv)  # a token from another browser is worthless here
    assert w.post("/job/cancel", {**form, "csrf": other.get(page).csrf()}).status == 403
    token = w.get(page).csrf()
    evil = w.post("/job/cancel", {**form, "csrf": token},
                  headers={"Origin": "http://evil.example"})
    assert evil.status == 403 and "cross-origin" in evil.body
    assert status_of(c, job_id) == pb.JOB_STATUS_SCHEDULED
    assert "CancelJob: OK" in w.post("/job/cancel", {**form, "csrf": token}).body


def test_auth_required_when_token_set(secured):
    w = web(secured)
    first = w.get("/config", follow=False)
    assert first.status == 303 and first.location.startswith("/login?next=")
    assert w.get("/shard?id=x", follow=False).status == 303
    login = w.get(first.location)
    assert login.status == 200 and 'type="password"' in login.body
    wrong = w.post("/login", {"token": "nope", "next": "/config", "csrf": login.csrf()})
    assert wrong.status == 401 and "wrong token" in wrong.body
    ok = w.post("/login", {"token": "s3cret", "next": "/config", "csrf": login.csrf()})
    assert ok.status == 200 and "Running configuration" in ok.body
    assert "s3cret" not in ok.body and "&lt;redacted&gt;" in ok.body
    out = w.post_form("/", "/logout", {})
    assert 'type="password"' in out.body and w.get("/", follow=False).status == 303


def test_auth_bearer_header_and_post_without_session(secured):
    assert web(secured, headers={"Authorization": "Bearer s3cret"}).get("/").status == 200
    assert web(secured, headers={"Authorization": "Bearer nope"}).get(
        "/", follow=False).status == 303
    anon = web(secured)
    token = anon.get("/login").csrf()
    assert anon.post("/tenant/drop-state", {"name": "t", "csrf": token}).status == 401
    assert anon.post("/login", {"token": "s3cret", "next": "https://evil.example/",
                                "csrf": token}, follow=False).location == "/"


def test_tenancy_pages_and_drop_holders(secured):
    w = web(secured, headers={"Authorization": "Bearer s3cret"})
    page = w.get("/tenants")
    assert page.status == 200 and 'href="/tenants"' in page.body
    t = w.get("/tenant?name=acme")
    assert t.status == 200 and 'id="drop-holders"' in t.body
    done = w.post_form("/tenant?name=acme", "/tenant/drop-state", {"name": "acme"})
    assert "DropTenantHolders: 0 holder(s) dropped" in done.body
    assert w.get("/job?id=x").status == 400  # tenancy on: the tenant is needed
    assert w.get("/job?id=x&tenant=acme").status == 404


def test_web_ui_can_be_turned_off(tmp_path):
    with Server(tmp_path / "d", "--no-webui-enabled", "--processes", "1") as s:
        assert s.web_addr == ""
        assert "webui=off" in next(x for x in s.log if "silo serving on" in x)


def test_second_server_on_the_same_web_port_is_refused(srv, tmp_path):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    r = subprocess.run([sys.executable, "-m", "silo", "serve", "--data-dir",
                        str(tmp_path / "b"), "--grpc-addr", "127.0.0.1:0",
                        "--webui-addr", srv.web_addr], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and f"cannot listen on {srv.web_addr}" in r.stderr


def test_web_ui_keeps_serving_while_a_worker_restarts(tmp_path):
    """Every worker serves the port: with one killed, the other answers every page
    (the dead one's counters shown as unavailable) until its replacement is back."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    with Server(tmp_path / "d", "--processes", "2") as s:
        pid = s.proc.pid
        victim = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[1])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60

        def alive() -> bool:
            # Its sockets close with its last thread: a killed process's main thread
            # can be a zombie while its other threads (SlateDB's, grpc's) still exit
            # and hold the descriptor table, so a zombie with threads left still counts.
            try:
                zombie = "\tZ" in Path(f"/proc/{victim}/status").read_text()
                return not zombie or len(os.listdir(f"/proc/{victim}/task")) > 1
            except FileNotFoundError:
                return False

        while alive():  # until then the kernel may still hand it a connection (reset)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        statuses = []
        while True:
            page = web(s).get("/")
            statuses.append(page.status)
            if page.status == 200 and "unavailable" not in page.body:
                break
            assert time.monotonic() < deadline, page.body[-500:]
            time.sleep(0.05)
        assert set(statuses) == {200}, statuses
