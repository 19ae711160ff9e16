"""The web UI in a real browser (headless Debian chromium via selenium): every page
renders with no console error and a non-blank screenshot; the job list filters
through its form, the SQL console runs a query; Cancel, Restart and Delete work
through the buttons; the login form works; reading pages work with JavaScript off. SILO_WEB_SCREENSHOTS=DIR saves the
overview and a job page there (docs/ holds the committed ones)."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from silo._proto import silo_pb2 as pb
from tests.integration.browser import (
    console_errors,
    screenshot_colours,
    start_chromium,
    stop_chromium,
)
from tests.integration.harness import Server

NOT_FOUND = "the server responded with a status of 404"


@pytest.fixture(scope="module")
def driver():
    d = start_chromium()
    try:
        yield d
    finally:
        stop_chromium(d)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("webb") / "d", "--processes", "2") as s:
        yield s


def open_page(driver, srv, path: str, allow: tuple[str, ...] = ()):
    driver.get(f"http://{srv.web_addr}{path}")
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.readyState") == "complete")
    assert console_errors(driver, allow) == [], path
    assert screenshot_colours(driver) >= 3, f"{path} looks blank"


def wait_text(driver, css: str, text: str) -> None:
    # While a click navigates, the element found may belong to the page being left:
    # chromium then answers "Node with given id does not belong to the document" (a
    # plain WebDriverException, not selenium's stale-element one). Look again.
    WebDriverWait(driver, 30, ignored_exceptions=(WebDriverException,)).until(
        ec.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))


def sample_jobs(c) -> tuple[str, str]:
    """A failed-then-succeeded job with payload and metadata, and a scheduled one."""
    done = c.enqueue(payload=msgspec.msgpack.encode({"to": "a@b.c", "items": [1, 2, 3]}),
                     metadata={"customer": "acme", "plan": "pro"}, task_group="mail",
                     limits=[pb.Limit(concurrency=pb.ConcurrencyLimit(key="smtp",
                                                                     max_concurrency=4))],
                     retry_policy=pb.RetryPolicy(retry_count=2, initial_interval_ms=1,
                                                 max_interval_ms=10, backoff_factor=2))
    (task,) = c.lease(group="mail")
    c.fail(task, code="SMTP_TIMEOUT", data=msgspec.msgpack.encode({"after_ms": 5000}))
    deadline = time.monotonic() + 30
    while True:
        tasks = c.lease(group="mail")
        if tasks:
            c.succeed(tasks[0], msgspec.msgpack.encode({"sent": True}))
            break
        assert time.monotonic() < deadline, "retry never became leasable"
        time.sleep(0.05)
    later = c.enqueue(payload=msgspec.msgpack.encode({"report": "weekly"}),
                      start_at_ms=int(time.time() * 1000) + 3_600_000, task_group="reports")
    return done, later


def test_every_page_renders_without_console_errors(driver, srv):
    c = srv.client()
    done, later = sample_jobs(c)
    shard = c.shard_for(None)
    open_page(driver, srv, "/")
    assert driver.find_element(By.ID, "autorefresh").is_displayed()  # the script ran
    shots = os.environ.get("SILO_WEB_SCREENSHOTS")
    if shots:
        driver.save_screenshot(os.path.join(shots, "webui-overview.png"))
    open_page(driver, srv, f"/shard?id={shard}")
    open_page(driver, srv, f"/job?id={done}&shard={shard}")
    assert driver.find_element(By.ID, "job-status").text == "succeeded"
    assert "SMTP_TIMEOUT" in driver.find_element(By.ID, "attempts").text
    assert '"sent": true' in driver.find_element(By.ID, "result").text
    if shots:
        driver.set_window_size(1280, 1500)
        driver.save_screenshot(os.path.join(shots, "webui-job.png"))
        driver.set_window_size(1280, 900)
    open_page(driver, srv, f"/job?id={later}")
    open_page(driver, srv, f"/job/delete?id={done}&shard={shard}")
    open_page(driver, srv, "/config")
    open_page(driver, srv, "/no/such/page", allow=(NOT_FOUND,))
    assert "Not found" in driver.find_element(By.TAG_NAME, "h1").text


def test_every_new_page_filter_and_console(driver, srv):
    """Jobs (filtered through the form), SQL console, queues, one queue, task groups
    with their chart: each renders with no console error and a non-blank screenshot."""
    c = srv.client()
    lim = [pb.Limit(concurrency=pb.ConcurrencyLimit(key="browser-q", max_concurrency=1))]
    wanted = c.enqueue(task_group="listing", metadata={"customer": "zeta"}, limits=lim)
    c.enqueue(task_group="listing", metadata={"customer": "omega"}, limits=lim)
    shots = os.environ.get("SILO_WEB_SCREENSHOTS")
    open_page(driver, srv, "/jobs")
    driver.find_element(By.NAME, "key").send_keys("customer")
    driver.find_element(By.NAME, "value").send_keys("zeta")
    driver.find_element(By.ID, "apply-filters").click()
    wait_text(driver, "#jobs tbody", wanted)
    rows = driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
    assert len(rows) == 1 and "value=zeta" in driver.current_url
    assert console_errors(driver) == [] and screenshot_colours(driver) >= 3
    if shots:
        open_page(driver, srv, "/jobs")
        driver.save_screenshot(os.path.join(shots, "webui-jobs.png"))
    open_page(driver, srv, "/sql")
    box = driver.find_element(By.ID, "sql-text")
    box.send_keys("SELECT task_group, COUNT(*) AS n FROM jobs GROUP BY task_group "
                  "ORDER BY task_group")
    driver.find_element(By.ID, "run-sql").click()
    wait_text(driver, "#sql-result", "listing")
    assert "Int64" in driver.find_element(By.ID, "sql-result").text
    assert console_errors(driver) == [] and screenshot_colours(driver) >= 3
    for path in ("/queues", "/queue?name=browser-q", "/groups", "/group?name=listing",
                 "/group?name=listing&counts=1"):
        open_page(driver, srv, path)
    assert driver.find_element(By.CSS_SELECTOR, "#rate-chart svg polyline").is_displayed()
    if shots:
        open_page(driver, srv, "/group?name=listing")
        driver.save_screenshot(os.path.join(shots, "webui-group.png"))


def test_cancel_restart_delete_through_the_buttons(driver, srv):
    c = srv.client()
    job_id = c.enqueue(start_at_ms=int(time.time() * 1000) + 3_600_000)
    open_page(driver, srv, f"/job?id={job_id}")
    driver.find_element(By.ID, "cancel").click()
    wait_text(driver, "#job-status", "cancelled")
    assert "CancelJob: OK" in driver.find_element(By.CSS_SELECTOR, ".flash").text
    assert c.get(job_id).status == pb.JOB_STATUS_CANCELLED
    driver.find_element(By.ID, "restart").click()
    wait_text(driver, "#job-status", "scheduled")
    assert c.get(job_id).status == pb.JOB_STATUS_SCHEDULED
    assert [b.text for b in driver.find_elements(By.CSS_SELECTOR, ".actions button")] == [
        "Cancel", "Expedite"]
    driver.find_element(By.ID, "cancel").click()
    wait_text(driver, "#job-status", "cancelled")
    driver.find_element(By.ID, "delete").click()
    driver.find_element(By.ID, "confirm-delete").click()
    wait_text(driver, ".flash", f"job {job_id} deleted")
    assert console_errors(driver) == []


def test_login_form_in_the_browser(driver, tmp_path):
    with Server(tmp_path / "d", "--processes", "1", "--tenancy", "--auth-token", "s3cret") as s:
        driver.delete_all_cookies()
        driver.get(f"http://{s.web_addr}/tenants")
        box = driver.find_element(By.NAME, "token")
        box.send_keys("s3cret")
        box.submit()
        wait_text(driver, "h1", "Tenants")
        driver.find_element(By.NAME, "name").send_keys("acme")
        driver.find_element(By.CSS_SELECTOR, "main form button").click()
        # the click navigates to the tenant's page: wait for it, not for luck
        wait_text(driver, "h1", "Tenant acme")
        driver.find_element(By.ID, "drop-holders").click()
        wait_text(driver, ".flash", "0 holder(s) dropped")
        driver.get(f"http://{s.web_addr}/tenants")
        wait_text(driver, "#tenants", "tenant")
        assert console_errors(driver) == []
        assert screenshot_colours(driver) >= 3


def test_pages_and_buttons_work_with_javascript_off(srv):
    d = start_chromium(javascript=False)
    try:
        c = srv.client()
        job_id = c.enqueue()
        open_page(d, srv, "/")
        assert not d.find_element(By.ID, "autorefresh").is_displayed()  # no script ran
        assert len(d.find_elements(By.CSS_SELECTOR, "#shards tbody tr")) == 8
        for path in ("/jobs", "/queues", "/groups", "/group?name=g"):
            open_page(d, srv, path)
        assert d.find_element(By.CSS_SELECTOR, "#rate-chart svg").is_displayed()
        open_page(d, srv, "/jobs?status=Waiting")
        assert d.find_elements(By.CSS_SELECTOR, "#jobs tbody tr a")
        open_page(d, srv, f"/job?id={job_id}")
        d.find_element(By.ID, "cancel").click()
        wait_text(d, "#job-status", "cancelled")
        assert c.get(job_id).status == pb.JOB_STATUS_CANCELLED
    finally:
        stop_chromium(d)
