"""A thin synchronous facade over :class:`SiloClient` for scripts and threaded code.

    from silo.client.sync import SyncSiloClient

    with SyncSiloClient(["127.0.0.1:7450"]) as client:
        job = client.enqueue({"n": 1}, "tg")
        print(job.await_result(timeout=10))

The async client lives on a private event loop running in a daemon thread; every method
of the async client is available here with the same arguments, blocking until done.
Methods returning a JobHandle return a :class:`SyncJobHandle` instead. Safe to call from
several threads at once.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from silo.client.client import SiloClient
from silo.client.handle import JobHandle

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="silo-client-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("SyncSiloClient called from its own event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class SyncJobHandle:
    """Blocking twin of :class:`JobHandle`."""

    def __init__(self, loop: _Loop, handle: JobHandle) -> None:
        self._loop = loop
        self.handle = handle

    @property
    def id(self) -> str:
        return self.handle.id

    @property
    def tenant(self) -> str | None:
        return self.handle.tenant

    def __repr__(self) -> str:
        return f"SyncJobHandle(id={self.id!r}, tenant={self.tenant!r})"

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.handle, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run(attr(*args, **kwargs))

        return call


class SyncSiloClient:
    """Blocking twin of :class:`SiloClient`; takes the same constructor arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = _Loop()
        self.client = SiloClient(*args, **kwargs)
        self._closed = False

    def __enter__(self) -> SyncSiloClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self.client.close(), timeout=10)
        finally:
            self._loop.stop()

    def handle(self, job_id: str, tenant: str | None = None) -> SyncJobHandle:
        return SyncJobHandle(self._loop, self.client.handle(job_id, tenant))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run any coroutine (e.g. using ``self.client``) on the client's loop."""
        return self._loop.run(coro)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            result = self._loop.run(attr(*args, **kwargs))
            if isinstance(result, JobHandle):
                return SyncJobHandle(self._loop, result)
            return result

        return call
