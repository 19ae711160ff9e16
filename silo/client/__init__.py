"""Python client of Silo's gRPC API (asyncio first; blocking facade in ``silo.client.sync``).

    import asyncio
    from silo.client import SiloClient

    async def main():
        async with SiloClient(["127.0.0.1:7450"]) as client:
            job = await client.enqueue({"hello": "world"}, "my-group")
            print(await job.await_result(timeout=30))

    asyncio.run(main())

Workers live in :mod:`silo.worker`.
"""

from silo.client.client import ClientStats, SiloClient, default_channel_options
from silo.client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    DuplicateTaskDelivery,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    JobAlreadyExists,
    JobNotFound,
    JobNotTerminal,
    LeaseLost,
    NotFound,
    PermissionDenied,
    RequestCancelled,
    ResourceExhausted,
    SiloError,
    TaskNotFound,
    TopologyError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from silo.client.handle import JobHandle
from silo.client.routing import ShardInfo, Topology, hash_tenant
from silo.client.types import (
    AttemptStatus,
    Cancelled,
    ConcurrencyLimit,
    Failure,
    FloatingConcurrencyLimit,
    ImportAttempt,
    ImportJob,
    ImportResult,
    Job,
    JobAttempt,
    JobResult,
    JobStatus,
    LeaseResult,
    QueryResult,
    RateLimit,
    RateLimitAlgorithm,
    RateLimitRetryPolicy,
    RefreshTask,
    RetryPolicy,
    Success,
    Task,
)

__all__ = [
    "AlreadyExists", "AttemptStatus", "Cancelled", "ClientStats", "ConcurrencyLimit",
    "DeadlineExceeded", "DuplicateTaskDelivery", "FailedPrecondition", "Failure",
    "FloatingConcurrencyLimit", "ImportAttempt", "ImportJob", "ImportResult", "Internal",
    "InvalidArgument", "Job", "JobAlreadyExists", "JobAttempt", "JobHandle", "JobNotFound",
    "JobNotTerminal", "JobResult", "JobStatus", "LeaseLost", "LeaseResult", "NotFound",
    "PermissionDenied", "QueryResult", "RateLimit", "RateLimitAlgorithm",
    "RateLimitRetryPolicy", "RefreshTask", "RequestCancelled", "ResourceExhausted",
    "RetryPolicy", "ShardInfo", "SiloClient", "SiloError", "Success", "Task", "TaskNotFound",
    "TopologyError", "Topology", "Unauthenticated", "Unavailable", "Unimplemented",
    "default_channel_options", "hash_tenant",
]
