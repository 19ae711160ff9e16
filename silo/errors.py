"""Every error a client can see, with its gRPC status and the exact phrase clients match.

Silo's clients decide what to do from the status code plus a substring of the message
("shard not found" re-routes, "lease not found"/"lease owner mismatch" mean a lost
lease, "terminal state" on cancel), so those phrases are written here once and used
everywhere. No NOT_FOUND message other than the routing miss may contain
"shard not found".
"""

from __future__ import annotations

import grpc

Code = grpc.StatusCode

# Longest caller-given value an error message quotes; longer ones are cut (a 1 MB id
# echoed back would turn the answer into RESOURCE_EXHAUSTED).
MAX_ECHO_CHARS = 128
# Longest message any error carries.
MAX_MESSAGE_CHARS = 1024


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """A value for an error message, cut to `limit` characters plus "…"."""
    s = str(value)
    return s if len(s) <= limit else s[:limit] + "…"


class SiloError(Exception):
    """An error answered to the caller as a gRPC status; nothing was changed."""

    def __init__(
        self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


def invalid(message: str) -> SiloError:
    return SiloError(Code.INVALID_ARGUMENT, message)


def precondition(message: str) -> SiloError:
    return SiloError(Code.FAILED_PRECONDITION, message)


def job_not_found() -> SiloError:
    return SiloError(Code.NOT_FOUND, "job not found")


def lease_not_found() -> SiloError:
    return SiloError(Code.NOT_FOUND, "lease not found")


def lease_owner_mismatch() -> SiloError:
    return SiloError(Code.FAILED_PRECONDITION, "lease owner mismatch")


def job_already_exists(job_id: str) -> SiloError:
    return SiloError(Code.ALREADY_EXISTS, f"job already exists with id {clip(job_id)}")


def job_already_cancelled() -> SiloError:
    return SiloError(Code.FAILED_PRECONDITION, "job is already cancelled")


def job_already_terminal() -> SiloError:
    return SiloError(Code.FAILED_PRECONDITION, "job is already in terminal state")


def cannot(verb: str, job_id: str, reason: str, status_name: str) -> SiloError:
    return SiloError(
        Code.FAILED_PRECONDITION, f"cannot {verb} job {clip(job_id)}: {reason} (status: {status_name})"
    )


def shard_not_found(owner_addr: str | None = None) -> SiloError:
    """The one routing miss: the client re-resolves the tenant and retries."""
    trailers = (("x-silo-shard-owner-addr", owner_addr),) if owner_addr else ()
    return SiloError(Code.NOT_FOUND, "shard not found", trailers)


def shard_unavailable(reason: str) -> SiloError:
    return SiloError(Code.UNAVAILABLE, f"shard not ready: {reason}")


def unimplemented(rpc: str, why: str) -> SiloError:
    return SiloError(Code.UNIMPLEMENTED, f"{rpc} is not implemented yet: {why}")
