"""One structured log event per operational fact.

An event is a log record on the `silo.events` logger whose message reads
`event=<name> key=value …` in text logs; the JSON formatter (silo.runtime.server) puts
the same fields at the top level of the document (`"event": "shard_opened",
"shard": …`), so a log pipeline can select on them without parsing text.

Events: `startup_config`, `shard_opened`, `shard_closed`, `worker_restarted`,
`lease_expired`, `slow_query`, `storage_error`.
"""

from __future__ import annotations

import logging

from silo.observability import metrics

log = logging.getLogger("silo.events")


def _text(value: object) -> str:
    s = str(value)
    if not s or any(c in s for c in ' ="'):
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return s


def emit(name: str, level: int = logging.INFO, **fields: object) -> None:
    if not log.isEnabledFor(level):
        return
    text = " ".join([f"event={name}", *(f"{k}={_text(v)}" for k, v in fields.items())])
    log.log(level, "%s", text, extra={"silo_fields": {"event": name, **fields}})


def startup_config(config) -> None:
    emit("startup_config", **config.redacted())


def shard_opened(shard, seconds: float) -> None:
    metrics.SHARD_OPEN_SECONDS.set((shard.id,), seconds)
    emit("shard_opened", shard=shard.id, duration_ms=round(seconds * 1000, 1),
         total_jobs=shard.total_jobs, completed_jobs=shard.completed_jobs,
         pending_tasks=shard.scheduled_jobs, leases=len(shard.leases))


def shard_closed(shard_id: str, seconds: float) -> None:
    emit("shard_closed", shard=shard_id, duration_ms=round(seconds * 1000, 1))


def worker_restarted(index: int, pid: int, cause: str, delay_s: float = 0.0) -> None:
    """The supervisor reaped a crashed worker and will start a new one."""
    metrics.WORKER_RESTARTS.inc((str(index), cause.split(" (")[0]))
    metrics.flush()  # the supervisor has no flush loop
    metrics.process_exited(pid)
    emit("worker_restarted", logging.WARNING, worker=index, pid=pid, cause=cause,
         restart_in_s=round(delay_s, 2))


def lease_expired(shard_id: str, task_id: str, job_id: str, attempt: int,
                  worker_id: str) -> None:
    emit("lease_expired", shard=shard_id, task_id=task_id, job_id=job_id, attempt=attempt,
         worker_id=worker_id)


def slow_query(shard_id: str, sql: str, seconds: float) -> None:
    """For the query engine: a statement slower than server.slow_query_log_ms."""
    emit("slow_query", logging.WARNING, shard=shard_id, duration_ms=round(seconds * 1000, 1),
         sql=sql[:512])


def storage_error(shard_id: str, error: BaseException) -> None:
    metrics.STORAGE_ERRORS.inc((shard_id,))
    emit("storage_error", logging.ERROR, shard=shard_id, error=str(error))
