"""Typed errors of the Silo client.

Every failed RPC surfaces as a :class:`SiloError` subclass chosen from its gRPC status
code, carrying ``code``, ``message`` (the server's status message as-is, or the client's
own text for the job errors) and ``trailers`` (the trailing metadata as a dict). A few
situations get their own class because callers act on them: :class:`JobNotFound`,
:class:`JobAlreadyExists`, :class:`JobNotTerminal` and :class:`LeaseLost`.

Errors the client raises without a server status (topology discovery failed, no shard
for a tenant, duplicate task delivery) are :class:`SiloError` subclasses too, with
``code`` set to ``None``.
"""

from __future__ import annotations

from typing import Any

import grpc

Code = grpc.StatusCode

SHARD_NOT_FOUND = "shard not found"
LEASE_NOT_FOUND = "lease not found"
LEASE_OWNER_MISMATCH = "lease owner mismatch"
OWNER_TRAILER = "x-silo-shard-owner-addr"


class SiloError(Exception):
    """Base of every client error: ``code`` (gRPC status or None), ``message``, ``trailers``."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 trailers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.trailers: dict[str, str] = trailers or {}

    def __str__(self) -> str:
        return self.message

    @property
    def code_name(self) -> str:
        return self.code.name if self.code is not None else type(self).__name__


# ---- one class per status code ------------------------------------------------------


class NotFound(SiloError):
    pass


class AlreadyExists(SiloError):
    pass


class InvalidArgument(SiloError):
    pass


class FailedPrecondition(SiloError):
    pass


class Unauthenticated(SiloError):
    pass


class PermissionDenied(SiloError):
    pass


class ResourceExhausted(SiloError):
    pass


class Unavailable(SiloError):
    pass


class DeadlineExceeded(SiloError):
    pass


class Unimplemented(SiloError):
    pass


class Internal(SiloError):
    pass


class RequestCancelled(SiloError):
    """The RPC was cancelled (for example because the client was closed)."""


# ---- situations callers act on -----------------------------------------------------


class JobNotFound(NotFound):
    def __init__(self, job_id: str, tenant: str | None = None, *,
                 server_message: str = "", trailers: dict[str, str] | None = None) -> None:
        where = f" (tenant {tenant})" if tenant else ""
        super().__init__(f"Job {job_id} not found{where}", Code.NOT_FOUND, trailers)
        self.job_id = job_id
        self.tenant = tenant
        self.server_message = server_message


class JobAlreadyExists(AlreadyExists):
    def __init__(self, job_id: str, message: str = "",
                 trailers: dict[str, str] | None = None) -> None:
        super().__init__(message or f"Job {job_id} already exists", Code.ALREADY_EXISTS,
                         trailers)
        self.job_id = job_id


class JobNotTerminal(FailedPrecondition):
    """GetJobResult on a job that has not finished; ``status`` is its current JobStatus."""

    def __init__(self, job_id: str, status: Any = None) -> None:
        name = getattr(status, "label", None) or (str(status) if status is not None else "?")
        super().__init__(f"Job {job_id} is not in a terminal state (status: {name})",
                         Code.FAILED_PRECONDITION)
        self.job_id = job_id
        self.status = status


class LeaseLost(SiloError):
    """Heartbeat/ReportOutcome: the lease expired, was reaped, or belongs to another worker."""


class TaskNotFound(NotFound):
    pass


class DuplicateTaskDelivery(SiloError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"Task {task_id} was delivered again while still running")
        self.task_id = task_id


class TopologyError(SiloError):
    """Cluster discovery failed, or no shard covers a tenant's hash."""


_BY_CODE: dict[grpc.StatusCode, type[SiloError]] = {
    Code.NOT_FOUND: NotFound,
    Code.ALREADY_EXISTS: AlreadyExists,
    Code.INVALID_ARGUMENT: InvalidArgument,
    Code.FAILED_PRECONDITION: FailedPrecondition,
    Code.UNAUTHENTICATED: Unauthenticated,
    Code.PERMISSION_DENIED: PermissionDenied,
    Code.RESOURCE_EXHAUSTED: ResourceExhausted,
    Code.UNAVAILABLE: Unavailable,
    Code.DEADLINE_EXCEEDED: DeadlineExceeded,
    Code.UNIMPLEMENTED: Unimplemented,
    Code.INTERNAL: Internal,
    Code.CANCELLED: RequestCancelled,
}


def trailers_of(err: grpc.RpcError) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        md = err.trailing_metadata()  # type: ignore[attr-defined]
    except Exception:
        return out
    for k, v in md or ():
        out[k] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return out


def status_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    try:
        return err.code(), err.details() or ""  # type: ignore[attr-defined]
    except Exception:
        return Code.UNKNOWN, str(err)


def from_rpc_error(err: grpc.RpcError, *, op: str = "", job_id: str | None = None,
                   tenant: str | None = None) -> SiloError:
    """The typed error for a failed RPC. ``op`` refines a few codes:

    * ``"job"`` (calls addressing one job by ``job_id``): NOT_FOUND → JobNotFound;
    * ``"enqueue"``: ALREADY_EXISTS → JobAlreadyExists;
    * ``"lease"`` (Heartbeat, ReportOutcome): NOT_FOUND "lease not found" /
      FAILED_PRECONDITION "lease owner mismatch" → LeaseLost.
    """
    code, message = status_of(err)
    trailers = trailers_of(err)
    if op == "lease" and (
        (code == Code.NOT_FOUND and LEASE_NOT_FOUND in message)
        or (code == Code.FAILED_PRECONDITION and LEASE_OWNER_MISMATCH in message)
    ):
        return LeaseLost(message, code, trailers)
    if op == "job" and code == Code.NOT_FOUND and SHARD_NOT_FOUND not in message:
        return JobNotFound(job_id or "", tenant, server_message=message, trailers=trailers)
    if op == "enqueue" and code == Code.ALREADY_EXISTS:
        return JobAlreadyExists(job_id or "", message, trailers)
    return _BY_CODE.get(code, SiloError)(message, code, trailers)


def is_lease_lost(err: BaseException) -> bool:
    return isinstance(err, LeaseLost)


def is_wrong_shard(code: grpc.StatusCode, message: str) -> bool:
    return code == Code.NOT_FOUND and SHARD_NOT_FOUND in message


def is_connectivity(code: grpc.StatusCode, message: str) -> bool:
    return code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED) or (
        code == Code.INTERNAL and "RST_STREAM" in message)
