"""JobHandle: a job id plus its tenant, with the calls that address that job."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from silo.client.client import SiloClient
    from silo.client.types import Job, JobResult, JobStatus


class JobHandle:
    """Returned by :meth:`SiloClient.enqueue` (or :meth:`SiloClient.handle`)."""

    __slots__ = ("client", "id", "tenant")

    def __init__(self, client: SiloClient, job_id: str, tenant: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.tenant = tenant

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id!r}, tenant={self.tenant!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, JobHandle) and other.id == self.id
                and other.tenant == self.tenant)

    def __hash__(self) -> int:
        return hash((self.id, self.tenant))

    async def get(self, *, include_attempts: bool = False) -> Job:
        return await self.client.get_job(self.id, self.tenant, include_attempts=include_attempts)

    async def status(self) -> JobStatus:
        return await self.client.get_job_status(self.id, self.tenant)

    async def result(self) -> JobResult:
        """The result now; JobNotTerminal while the job is still in progress."""
        return await self.client.get_job_result(self.id, self.tenant)

    async def cancel(self) -> None:
        await self.client.cancel_job(self.id, self.tenant)

    async def restart(self) -> None:
        await self.client.restart_job(self.id, self.tenant)

    async def expedite(self) -> None:
        await self.client.expedite_job(self.id, self.tenant)

    async def delete(self) -> None:
        await self.client.delete_job(self.id, self.tenant)

    async def await_result(self, timeout: float | None = None,
                           poll_interval: float = 0.5) -> JobResult:
        """Poll GetJobResult every ``poll_interval`` seconds until the job is terminal.

        Returns the :class:`JobResult` (check ``status``: Succeeded → ``result``, Failed →
        ``error_code``/``error_data``, Cancelled). Any error other than "not terminal yet"
        (e.g. JobNotFound) ends the wait at once. After ``timeout`` seconds raises
        ``TimeoutError("Timeout waiting for job <id> to complete after <n>ms")``.
        """
        start = time.monotonic()
        while True:
            r = await self.client._try_job_result(self.id, self.tenant)
            if r is not None:
                return r
            delay = poll_interval
            if timeout is not None:
                left = timeout - (time.monotonic() - start)
                if left <= 0:
                    raise TimeoutError(f"Timeout waiting for job {self.id} to complete after "
                                       f"{int(round(timeout * 1000))}ms")
                delay = min(delay, left)
            await asyncio.sleep(delay)
