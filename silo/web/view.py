"""Reply → plain values for templates: names, times, decoded payloads. Pure functions."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import msgspec

from silo._proto import silo_pb2 as pb

JOB_STATUS = {
    pb.JOB_STATUS_SCHEDULED: "scheduled",
    pb.JOB_STATUS_RUNNING: "running",
    pb.JOB_STATUS_SUCCEEDED: "succeeded",
    pb.JOB_STATUS_FAILED: "failed",
    pb.JOB_STATUS_CANCELLED: "cancelled",
}
TERMINAL = {"succeeded", "failed", "cancelled"}
ATTEMPT_STATUS = {
    pb.ATTEMPT_STATUS_RUNNING: "running",
    pb.ATTEMPT_STATUS_SUCCEEDED: "succeeded",
    pb.ATTEMPT_STATUS_FAILED: "failed",
    pb.ATTEMPT_STATUS_CANCELLED: "cancelled",
}


def fmt_ms(ms: int | None) -> str:
    """Epoch milliseconds as UTC `YYYY-MM-DD HH:MM:SS.mmm`; "" for none/zero."""
    if not ms:
        return ""
    try:
        t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def fmt_duration(ms: int | None) -> str:
    if ms is None or ms < 0:
        return ""
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    if ms < 3_600_000:
        return f"{ms // 60_000} min {ms % 60_000 // 1000} s"
    return f"{ms // 3_600_000} h {ms % 3_600_000 // 60_000} min"


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)
        try:
            return b.decode()
        except UnicodeDecodeError:
            return {"$bytes_base64": base64.b64encode(b).decode()}
    if isinstance(v, dict):
        return {str(_jsonable(k)) if not isinstance(k, str) else k: _jsonable(x)
                for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, msgspec.msgpack.Ext):
        return {"$ext": v.code, "data_base64": base64.b64encode(v.data).decode()}
    if isinstance(v, dt.datetime):
        return v.isoformat()
    return v


def decode_msgpack(data: bytes | None) -> tuple[str, bool]:
    """A msgpack payload as pretty JSON, or a hex dump when it is not valid msgpack.

    Returns (text, decoded). Empty bytes mean "no value" and give ("", True)."""
    if not data:
        return "", True
    try:
        value = msgspec.msgpack.decode(data)
    except (msgspec.DecodeError, ValueError, TypeError):
        return "not msgpack; raw bytes: " + data[:4096].hex(" ") + (
            " …" if len(data) > 4096 else ""), False
    return json.dumps(_jsonable(value), indent=2, ensure_ascii=False, default=repr), True


def limit_rows(limits) -> list[tuple[str, str, str]]:
    """A job's limits as (type, key, value) rows."""
    rows = []
    for lim in limits:
        kind = lim.WhichOneof("limit")
        if kind == "concurrency":
            c = lim.concurrency
            rows.append(("concurrency", c.key, f"max {c.max_concurrency}"))
        elif kind == "floating_concurrency":
            f = lim.floating_concurrency
            rows.append(("floating concurrency", f.key,
                         f"default max {f.default_max_concurrency}, refresh every "
                         f"{fmt_duration(f.refresh_interval_ms)}"))
        elif kind == "rate_limit":
            r = lim.rate_limit
            rows.append(("rate limit", f"{r.name}/{r.unique_key}",
                         f"{r.limit} per {fmt_duration(r.duration_ms)}, {r.hits or 1} hit(s)"))
    return rows


def attempt_rows(job: pb.GetJobResponse) -> list[dict[str, Any]]:
    out = []
    for a in job.attempts:
        finished = a.finished_at_ms if a.HasField("finished_at_ms") else None
        error_data, _ = decode_msgpack(a.error_data.msgpack if a.HasField("error_data") else None)
        result, _ = decode_msgpack(a.result.msgpack if a.HasField("result") else None)
        out.append({
            "number": a.attempt_number,
            "task_id": a.task_id,
            "status": ATTEMPT_STATUS.get(a.status, str(a.status)),
            "started": fmt_ms(a.started_at_ms),
            "finished": fmt_ms(finished),
            "took": fmt_duration(finished - a.started_at_ms) if finished else "",
            "error_code": a.error_code if a.HasField("error_code") else "",
            "error_data": error_data,
            "result": result,
        })
    return out


def job_view(job: pb.GetJobResponse) -> dict[str, Any]:
    status = JOB_STATUS.get(job.status, str(job.status))
    payload, payload_ok = decode_msgpack(job.payload.msgpack)
    result, result_ok = decode_msgpack(job.result.msgpack if job.HasField("result") else None)
    rp = job.retry_policy if job.HasField("retry_policy") else None
    return {
        "id": job.id,
        "status": status,
        "terminal": status in TERMINAL,
        "priority": job.priority,
        "task_group": job.task_group,
        "enqueued": fmt_ms(job.enqueue_time_ms),
        "status_changed": fmt_ms(job.status_changed_at_ms),
        "next_attempt": fmt_ms(job.next_attempt_starts_after_ms)
        if job.HasField("next_attempt_starts_after_ms") else "",
        "metadata": sorted(job.metadata.items()),
        "limits": limit_rows(job.limits),
        "retry_policy": (f"{rp.retry_count} retries, initial back-off "
                         f"{fmt_duration(rp.initial_interval_ms)}, ×{rp.backoff_factor:g}, "
                         f"max {fmt_duration(rp.max_interval_ms)}"
                         + (", randomized" if rp.randomize_interval else "")) if rp else "",
        "payload": payload,
        "payload_ok": payload_ok,
        "result": result,
        "result_ok": result_ok,
        "attempts": attempt_rows(job),
    }


def to_toml(values: dict[str, object], sections: dict[str, str]) -> str:
    """Config values as TOML, grouped by section. `sections` maps name → "section.key"."""
    grouped: dict[str, list[str]] = {}
    for name, where in sections.items():
        section, _, key = where.partition(".")
        v = values[name]
        if isinstance(v, bool):
            lit = "true" if v else "false"
        elif isinstance(v, int | float):
            lit = repr(v)
        else:
            lit = json.dumps(str(v), ensure_ascii=False)
        grouped.setdefault(section, []).append(f"{key} = {lit}")
    return "\n\n".join(f"[{s}]\n" + "\n".join(lines) for s, lines in grouped.items()) + "\n"
