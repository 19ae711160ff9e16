"""Profiling helpers (filled in below)."""

from __future__ import annotations

import contextlib
import ctypes
import os

PR_SET_PTRACER = 0x59616D61  # "Yama"


def allow_ptrace_from_parent() -> None:
    """Let the supervisor and its descendants (py-spy started by any worker) ptrace this
    worker under Yama ptrace_scope 1, where only ancestors may otherwise attach."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, os.getppid(), 0, 0, 0)
