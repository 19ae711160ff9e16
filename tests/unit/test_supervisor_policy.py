"""The supervisor's pure policy: restart back-off and the shared process table."""

from __future__ import annotations

import os

from silo.runtime import status
from silo.runtime.supervisor import BACKOFF_MAX_S, backoff_s, unresponsive_after


def test_backoff_doubles_from_half_a_second_and_is_capped():
    assert [backoff_s(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(10_000) == BACKOFF_MAX_S
    assert backoff_s(0) == 0.5


def test_process_table_is_shared_with_forked_children():
    t = status.ProcessTable(3)
    for i in range(3):
        t.set_state(i, status.SERVING)
    assert t.all_serving()
    t.set_state(1, status.UNRESPONSIVE)
    t.count_restart(1)
    t.count_restart(1)
    t.set_pid(1, 4242)
    assert not t.all_serving()
    assert t.snapshot()[1] == {"index": 1, "state": "unresponsive", "pid": 4242,
                               "restarts": 2}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child sees the parent's writes, and the parent sees the child's
        ok = t.restarts(1) == 2 and t.state(1) == status.UNRESPONSIVE
        t.set_state(2, status.DOWN)
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    assert t.state(2) == status.DOWN


def test_unresponsive_after_about_three_seconds_of_silence():
    assert unresponsive_after(1.0, 10) == 3
    assert unresponsive_after(2.0, 10_000) == 2  # never after a single late pong
    assert unresponsive_after(0.1, 5) == 5  # never later than the kill
