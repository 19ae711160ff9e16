"""The web UI's list and console pages over HTTP against the real server (2 worker
processes, jobs on shards of both): the job list (filters, keyset pages, bad
parameters), the SQL console (results, types, escaped engine errors), queues, task
groups (rates chart), tenants with counts, auth, and the origin check behind a proxy."""

from __future__ import annotations

import html
import re
import time

import pytest

from silo._proto import silo_pb2 as pb
from silo._proto import silo_pb2_grpc as pb_grpc
from silo.cluster.shardmap import hash_tenant
from tests.integration.harness import Server
from tests.integration.web_client import WebClient

EVIL = "<script>alert('x')</script>"
PUBLIC = "https://silo.example.com"
JOB_LINK = re.compile(r'href="/job\?id=([0-9a-zA-Z-]+)&amp;shard=')


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("webp") / "d", "--processes", "2",
                "--webui-public-origin", PUBLIC, "--webui-trust-forwarded") as s:
        yield s


@pytest.fixture(scope="module")
def tenanted(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("webpt") / "d", "--processes", "2", "--tenancy",
                "--auth-token", "s3cret") as s:
        yield s


def web(s: Server, **kw) -> WebClient:
    return WebClient(s.web_addr, **kw)


def enqueue_on(c, shard: str, **kw) -> str:
    kw.setdefault("task_group", "g")
    kw.setdefault("start_at_ms", int(time.time() * 1000))
    return c.stub.Enqueue(pb.EnqueueRequest(shard=shard, payload=pb.SerializedBytes(
        msgpack=b"\x80"), **kw), timeout=30).id


def listed(body: str) -> list[str]:
    return JOB_LINK.findall(body)


@pytest.fixture(scope="module")
def spread(srv):
    """25 jobs of group 'list' over every shard (both processes), newest last, each with
    metadata n=<i>, batch=b<i // 10>, and one with hostile metadata."""
    c = srv.client()
    ids = []
    for i in range(25):
        shard = c.owners[i % len(c.owners)].shard_id
        ids.append(enqueue_on(c, shard, task_group="list",
                              metadata={"n": str(i), "batch": f"b{i // 10}"}))
        time.sleep(0.002)  # distinct enqueue times: a deterministic order
    evil = enqueue_on(c, c.owners[0].shard_id, task_group="evil", metadata={"who": EVIL})
    return ids, evil


def test_job_list_is_newest_first_across_shards(srv, spread):
    ids, _ = spread
    page = web(srv).get("/jobs?group=list")
    assert page.status == 200, page.body
    assert listed(page.body) == ids[::-1]
    assert 'id="page-older"' not in page.body and 'data-refresh' not in page.body


def test_job_list_keyset_pages_forward_and_back(srv, spread):
    ids, _ = spread
    w = web(srv)
    first = w.get("/jobs?group=list&per_page=10")
    assert listed(first.body) == ids[::-1][:10]
    older = html.unescape(re.search(r'href="([^"]+)" id="page-older"', first.body).group(1))
    second = w.get(older)
    assert second.status == 200 and listed(second.body) == ids[::-1][10:20]
    third = w.get(html.unescape(re.search(r'href="([^"]+)" id="page-older"',
                                          second.body).group(1)))
    assert listed(third.body) == ids[::-1][20:] and 'id="page-older"' not in third.body
    back = w.get(html.unescape(re.search(r'href="([^"]+)" id="page-newer"',
                                         third.body).group(1)))
    assert listed(back.body) == ids[::-1][10:20]
    assert 'id="page-newest"' in back.body


@pytest.mark.parametrize("query, want", [
    ("key=n&value=7", [7]),
    ("key=batch&value=b2", [24, 23, 22, 21, 20]),
    ("key=n&value=1&match=prefix", [19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 1]),
    ("status=waiting", "all"),
    ("status=Running", []),
])
def test_job_list_filters(srv, spread, query, want):
    ids, _ = spread
    page = web(srv).get(f"/jobs?group=list&{query}")
    assert page.status == 200, page.body
    expect = ids[::-1] if want == "all" else [ids[i] for i in want]
    assert listed(page.body) == expect


def test_job_list_id_search_and_metadata_escaped(srv, spread):
    ids, evil = spread
    page = web(srv).get(f"/jobs?id={ids[3]}")
    assert listed(page.body) == [ids[3]]
    hostile = web(srv).get(f"/jobs?key=who&value={EVIL}")
    assert listed(hostile.body) == [evil]
    assert EVIL not in hostile.body and "&lt;script&gt;" in hostile.body


@pytest.mark.parametrize("query", [
    "status=bogus", "per_page=0", "per_page=9999", "per_page=x", "older=nonsense",
    "older=1~a~b&newer=1~a~b", "value=v", "match=fuzzy&key=k", "id=" + "x" * 300,
])
def test_job_list_bad_parameters_are_400_pages(srv, query):
    page = web(srv).get(f"/jobs?{query}")
    assert page.status == 400, (query, page.body[-300:])
    assert 'id="error-message"' in page.body and "Traceback" not in page.body


def test_sql_console_runs_over_all_shards_with_types(srv, spread):
    w = web(srv)
    empty = w.get("/sql")
    assert empty.status == 200 and 'id="sql-examples"' in empty.body
    page = w.get("/sql?q=" + "SELECT COUNT(*) AS n, MIN(priority) AS p FROM jobs "
                 "WHERE task_group = 'list'".replace(" ", "+"))
    assert page.status == 200, page.body
    assert "Int64" in page.body or "int64" in page.body
    assert re.search(r"<td>25</td>", page.body) and "1 row(s)" in page.body
    shard = srv.client().owners[0].shard_id
    one = w.get(f"/sql?shard={shard}&q=SELECT+COUNT(*)+AS+n+FROM+jobs+WHERE+task_group"
                "+%3D+%27list%27")
    assert one.status == 200 and re.search(r"<td>(\d+)</td>", one.body).group(1) != "25"


def test_sql_console_truncates_at_1000_rows(srv):
    page = web(srv).get("/sql?q=SELECT+*+FROM+UNNEST(range(1500))")
    if page.status == 400:  # the engine may refuse a table function: use jobs instead
        pytest.skip(page.body)
    assert "truncated" in page.body and page.body.count("<tr><td>") == 1000


def test_sql_errors_are_shown_escaped(srv):
    w = web(srv)
    bad = w.get("/sql?q=SELECT+nope+FROM+jobs+WHERE+x+%3D+%27%3Cscript%3E%27")
    assert bad.status == 400 and 'id="sql-error"' in bad.body
    assert "<script>" not in bad.body and "nope" in bad.body
    dml = w.get("/sql?q=DELETE+FROM+jobs")
    assert dml.status == 400 and 'id="sql-error"' in dml.body
    assert w.get("/sql?shard=nope&q=SELECT+1").status == 400
    assert w.get("/sql?q=" + "x" * 20_001).status == 400


def test_queues_and_one_queue(srv):
    c = srv.client()
    lim = [pb.Limit(concurrency=pb.ConcurrencyLimit(key="q<1>", max_concurrency=1))]
    holder = c.enqueue(task_group="qg", limits=lim)
    waiter = c.enqueue(task_group="qg", limits=lim)
    deadline = time.monotonic() + 30
    while not c.lease(n=1, group="qg"):  # the holder's job id is known once it runs
        assert time.monotonic() < deadline
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while True:
        page = web(srv).get("/queues")
        if "q&lt;1&gt;" in page.body and ">1</td><td class=\"num\">1</td>" in page.body:
            break
        assert time.monotonic() < deadline, page.body[-1500:]
        time.sleep(0.1)
    assert page.status == 200 and 'data-refresh="5"' in page.body and "q<1>" not in page.body
    one = web(srv).get("/queue?name=q%3C1%3E")
    assert one.status == 200
    holders = one.body.split('id="holders"')[1].split('id="waiters"')[0]
    waiters = one.body.split('id="waiters"')[1]
    assert holder in holders and waiter in waiters
    assert "max 1" in one.body
    assert web(srv).get("/queue").status == 400


def test_task_groups_chart_counts_enqueues_and_completions(srv):
    c = srv.client()
    for _ in range(3):
        c.enqueue(task_group="chart")
    for t in c.lease(n=10, group="chart"):
        c.succeed(t)
    c.enqueue(task_group="chart", start_at_ms=int(time.time() * 1000) + 3_600_000)
    groups = web(srv).get("/groups")
    assert groups.status == 200 and 'href="/group?name=chart"' in groups.body
    page = web(srv).get("/group?name=chart")
    assert page.status == 200
    svg = page.body.split('id="rate-chart"')[1].split("</figure>")[0]
    assert "<svg" in svg and svg.count("<polyline") == 2 and "http://" not in svg.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert "enqueued (" in svg and "completed (" in svg
    tiles = page.body.split('id="group-tiles"')[1].split("</section>")[0]
    assert re.search(r'value">1</span><span class="label">scheduled', tiles)
    assert 'id="count-statuses"' in page.body and 'id="group-counts"' not in page.body
    counted = web(srv).get("/group?name=chart&counts=1")
    table = counted.body.split('id="group-counts"')[1].split("</table>")[0]
    assert "Succeeded</th><td class=\"num\">3" in table and "Scheduled" in table
    assert web(srv).get("/group").status == 400


def test_origin_check_honours_public_origin_and_trusted_forwarded(srv):
    c = srv.client()
    job_id = c.enqueue(start_at_ms=int(time.time() * 1000) + 3_600_000)
    w = web(srv)
    path = f"/job?id={job_id}&shard={c.shard_for(None)}"
    form = {"id": job_id, "shard": c.shard_for(None), "csrf": w.get(path).csrf()}
    evil = w.post("/job/expedite", form, headers={"Origin": "https://evil.example"})
    assert evil.status == 403 and "cross-origin" in evil.body
    ok = w.post("/job/expedite", form, headers={"Origin": PUBLIC})
    assert ok.status == 200 and "ExpediteJob: OK" in ok.body
    fwd = w.post("/job/cancel", form, headers={
        "Origin": "https://proxy.internal:8443", "X-Forwarded-Host": "proxy.internal:8443",
        "X-Forwarded-Proto": "https"})
    assert fwd.status == 200 and "CancelJob: OK" in fwd.body
    liar = w.post("/job/restart", form, headers={
        "Origin": "https://evil.example", "X-Forwarded-Host": "proxy.internal:8443",
        "X-Forwarded-Proto": "https"})
    assert liar.status == 403


def test_tenants_list_counts_and_pages(tenanted):
    auth = (("authorization", "Bearer s3cret"),)
    stub = pb_grpc.SiloStub(tenanted.channel())
    owners = stub.GetClusterInfo(pb.GetClusterInfoRequest(), metadata=auth,
                                 timeout=10).shard_owners

    def shard_for(t: str) -> str:
        h = hash_tenant(t)
        return next(o.shard_id for o in owners if (not o.range_start or h >= o.range_start)
                    and (not o.range_end or h < o.range_end))

    for t, n in (("acme", 3), ("beta", 1), ("<b>x", 1)):
        for _ in range(n):
            stub.Enqueue(pb.EnqueueRequest(
                shard=shard_for(t), tenant=t, task_group="g",
                payload=pb.SerializedBytes(msgpack=b"\x80")),
                metadata=auth, timeout=30)
    w = web(tenanted, headers={"Authorization": "Bearer s3cret"})
    page = w.get("/tenants")
    assert page.status == 200 and 'data-refresh="10"' in page.body
    rows = page.body.split('id="tenants"')[1]
    assert re.search(r'name=acme">acme</a></td><td class="num">3</td>', rows)
    assert "&lt;b&gt;x" in rows and "<b>x" not in rows
    assert 'id="page-next"' not in page.body
    paged = w.get("/tenants?per_page=1&page=2")  # by name: <b>x, acme, beta
    assert 'id="page-next"' in paged.body and 'id="page-prev"' in paged.body
    listed_here = paged.body.split('id="tenants"')[1]
    assert ">acme<" in listed_here and ">beta<" not in listed_here
    for bad in ("page=0", "per_page=501", "page=x"):
        assert w.get(f"/tenants?{bad}").status == 400
    one = w.get("/tenant?name=acme")
    assert "Scheduled" in one.body or "scheduled" in one.body
    jobs = w.get("/jobs?tenant=acme")
    assert len(listed(jobs.body)) == 3 and "tenant=acme" in jobs.body


@pytest.mark.parametrize("path", ["/jobs", "/sql", "/queues", "/queue?name=x", "/groups",
                                  "/group?name=g", "/tenants"])
def test_new_pages_need_the_token(tenanted, path):
    anon = web(tenanted).get(path, follow=False)
    assert anon.status == 303 and anon.location.startswith("/login")
    authed = web(tenanted, headers={"Authorization": "Bearer s3cret"}).get(path)
    assert authed.status == 200, authed.body[-300:]


@pytest.mark.parametrize("path", ["/jobs", "/sql", "/queues", "/groups"])
def test_new_pages_open_without_auth_when_off(srv, path):
    page = web(srv).get(path, follow=False)
    assert page.status == 200 and "<nav>" in page.body
