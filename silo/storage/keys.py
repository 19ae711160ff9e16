"""The shard's key layout, in one place.

Every record of a shard lives in that shard's SlateDB database under a key made of a
one-byte prefix (the record kind) and an order-preserving tuple encoding, so that byte
order equals tuple order and a prefix scan walks one kind (or one tenant's rows of it)
in the order the state machine needs.

Tuple encoding:
* strings: UTF-8, each 0x00 byte escaped as 0x00 0xFF, terminated by 0x00 0x01. "a"
  sorts before "ab" and before "a\\x00b", exactly as the strings compare, and the
  two-byte terminator keeps the end unambiguous whatever byte the next field starts
  with (a bare 0x00 terminator would read a following 0xFF as an escaped NUL).
* integers: fixed-width big-endian unsigned (u8 priority, u32 attempt, u64 times).

| prefix | kind | key tuple | value (silo.storage.records) |
|---|---|---|---|
| 0x01 | job info | (tenant, job_id) | JobInfo (immutable after enqueue) |
| 0x02 | job status | (tenant, job_id) | JobStatus |
| 0x03 | status/time index | (tenant, status_name, u64::MAX − ts u64, job_id) | empty, but a Running row holds the job's Lease (layout 4); ts = next attempt start for Scheduled, else changed_at (newest first) |
| 0x04 | metadata index | (tenant, key, value, job_id) | empty |
| 0x05 | task (ready queue) | (task_group, start_ms u64, priority u8, job_id, attempt u32, tenant) | Task |
| 0x06 | lease | (task_id) | Lease; since layout 4 only a refresh task's (a RunAttempt's lease is its job's Running 0x03 row) |
| 0x07 | attempt | (tenant, job_id, attempt u32) | Attempt (terminal attempts; a running one is the lease) |
| 0x08 | concurrency request (parked) | (tenant, queue, start_ms u64, priority u8, job_id, attempt u32) | RequestTicket |
| 0x09 | concurrency holder | (tenant, queue, task_id) | granted_at_ms i64 |
| 0x0A | cancellation | (tenant, job_id) | Cancellation |
| 0x0B | floating limit state | (tenant, queue) | FloatingLimitState |
| 0x0C | rate limiter bucket | (name, unique_key) | RateLimitState |
| 0x0D | expiry index (retention) | (expire_at_ms u64, tenant, job_id) | empty; a terminal job to delete at expire_at_ms |
| 0x0E | pending task pointer | (tenant, job_id) | the 0x05 key of the job's pending task, only while that key's start time is not the job's next-attempt time (a rate-limit re-check) |
| 0x10 | enqueue-time index | (tenant, task_group, u64::MAX − enqueue_ms u64, job_id) | empty; the jobs of a task group, newest enqueue first (the job list's order; a tenant's whole list merges its groups' ranges) |
| 0x11 | metadata time index | (tenant, key, value, u64::MAX − enqueue_ms u64, job_id) | empty; the jobs with key = value, newest enqueue first |
| 0xF0 | shard counter | (name) | `jobs`: msgpack [total, completed] (layout 4; before: `total_jobs`, `completed_jobs`, i64 big-endian each); `tasks:<task_group>`: i64 big-endian, the group's pending task rows (silo.shard.depth); absolute values |
| 0xF8 | tenant status counter | (tenant, status) | i64 big-endian (absolute value); layouts ≤ 3 only, replaced by 0xF9 |
| 0xF9 | tenant counts | (tenant) | msgpack array of the tenant's job counts per status, by status number (Scheduled, Running, Succeeded, Failed, Cancelled); absent = all 0 (layout 4) |
| 0xFE | shard meta | (name) | bytes |

Shard meta names: `created_at_ms` (i64), `layout_version` (i64; absent = 1),
`task_counters` (i64 1: the `tasks:<group>` counters are complete; absent = count once). Layout 1 is
the first release (no 0x03/0x04/0x0D rows); layout 2 adds the status, metadata and expiry
indexes; layout 3 adds the enqueue-time indexes 0x10/0x11 (immutable after enqueue, like
the job info they derive from, so only enqueue, import, delete and retention write them).
Layout 4 changes where two things live, without a backfill:
* a RunAttempt's lease is the value of its job's Running status-index row (0x03), which
  lives exactly as long as the lease, instead of a 0x06 row (its put and delete were 2
  of a job's ~17 keys); the open restores leases from both (silo.shard.indexes.
  load_running, then the 0x06 rows), and an old 0x06 lease stays in its row until it
  ends;
* the job counters are one row per tenant (0xF9) and the shard's `jobs` row instead of
  one row per (tenant, status) and two totals (a batch wrote up to 3 rows per tenant it
  touched, now 1; silo.shard.counters); older rows are read at open and replaced by the
  shard's first batch, in that one batch.
A data dir of layout 4 must not be opened by an older release: it would see no leases
(running jobs never expire) and no counters.

A shard opened with an older layout backfills what is missing once (layouts 1 and 2),
then writes `layout_version = LAYOUT_VERSION` in the same batch as the last backfilled
rows (layout 3: at once, nothing to backfill).

The task key orders the ready queue exactly as upstream Silo: earliest start first,
then priority (lower first), then job id and attempt; the tenant only disambiguates
equal job ids of different tenants and never reorders otherwise-distinct tasks.
"""

from __future__ import annotations

JOB_INFO = 0x01
JOB_STATUS = 0x02
STATUS_INDEX = 0x03
METADATA_INDEX = 0x04
TASK = 0x05
LEASE = 0x06
ATTEMPT = 0x07
CONCURRENCY_REQUEST = 0x08
CONCURRENCY_HOLDER = 0x09
CANCELLATION = 0x0A
FLOATING_LIMIT = 0x0B
RATE_LIMIT_BUCKET = 0x0C
EXPIRY_INDEX = 0x0D
PENDING_POINTER = 0x0E
GROUP_TIME_INDEX = 0x10
METADATA_TIME_INDEX = 0x11
SHARD_COUNTER = 0xF0
TENANT_STATUS_COUNTER = 0xF8
TENANT_COUNTS = 0xF9
SHARD_META = 0xFE

# The layout this release writes; see the module docstring.
LAYOUT_VERSION = 4

_U64_MAX = (1 << 64) - 1


# Recent encodings (enc_str runs ~28 times per job, mostly on the same few tenants,
# status names and task groups, and on each job id several times in one step). Cleared
# whole when full: a bound, not an LRU.
_ENCODED: dict[str, bytes] = {}
_ENCODED_MAX = 8192


def enc_str(s: str) -> bytes:
    """Encode a string so byte order equals string order and the end is unambiguous.

    The NUL test is `0 in b`, not `b"\\x00" in b`: for a bytes needle CPython first tries
    it as an integer, which raises and formats a TypeError it then clears (~1,800
    instructions, 4 % of a stream job's server instructions with ~28 keys per job)."""
    e = _ENCODED.get(s)
    if e is None:
        b = s.encode()
        if 0 in b:
            b = b.replace(b"\x00", b"\x00\xff")
        e = b + b"\x00\x01"
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.clear()
        _ENCODED[s] = e
    return e


def dec_str(buf: bytes, pos: int) -> tuple[str, int]:
    """Decode a string written by enc_str at pos; return it and the position after it."""
    out = bytearray()
    while True:
        end = buf.index(0, pos)
        out += buf[pos:end]
        marker = buf[end + 1]
        if marker == 0xFF:
            out.append(0)
            pos = end + 2
            continue
        if marker != 0x01:
            raise ValueError(f"bad string encoding at byte {end}")
        return out.decode(), end + 2


def enc_u64(n: int) -> bytes:
    if not 0 <= n <= _U64_MAX:
        raise ValueError(f"u64 out of range: {n}")
    return n.to_bytes(8, "big")


def enc_u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _prefix(kind: int) -> bytes:
    return bytes((kind,))


# ---- job-addressed records -------------------------------------------------


def job_info(tenant: str, job_id: str) -> bytes:
    return b"\x01" + enc_str(tenant) + enc_str(job_id)


def job_status(tenant: str, job_id: str) -> bytes:
    return b"\x02" + enc_str(tenant) + enc_str(job_id)


def cancellation(tenant: str, job_id: str) -> bytes:
    return b"\x0a" + enc_str(tenant) + enc_str(job_id)


def attempt(tenant: str, job_id: str, attempt_number: int) -> bytes:
    return b"\x07" + enc_str(tenant) + enc_str(job_id) + enc_u32(attempt_number)


def attempts_prefix(tenant: str, job_id: str) -> bytes:
    """All attempts of one job, ascending by attempt number."""
    return b"\x07" + enc_str(tenant) + enc_str(job_id)


# ---- query indexes (0x03, 0x04) and retention (0x0D) -------------------------


def status_index(tenant: str, status_name: str, ts_ms: int, job_id: str) -> bytes:
    """One job in its status' index; within (tenant, status) the newest ts sorts first."""
    return (
        b"\x03" + enc_str(tenant) + enc_str(status_name)
        + enc_u64(_U64_MAX - max(0, ts_ms)) + enc_str(job_id)
    )


def status_index_prefix(tenant: str, status_name: str | None = None) -> bytes:
    """Every index row of a tenant, or of one status of it."""
    p = b"\x03" + enc_str(tenant)
    return p if status_name is None else p + enc_str(status_name)


def decode_status_index(key: bytes) -> tuple[str, str, int, str]:
    """(tenant, status_name, ts_ms, job_id) of a status index key."""
    tenant, pos = dec_str(key, 1)
    status_name, pos = dec_str(key, pos)
    ts = _U64_MAX - int.from_bytes(key[pos : pos + 8], "big")
    job_id, _ = dec_str(key, pos + 8)
    return tenant, status_name, ts, job_id


def metadata_index(tenant: str, key: str, value: str, job_id: str) -> bytes:
    return b"\x04" + enc_str(tenant) + enc_str(key) + enc_str(value) + enc_str(job_id)


def metadata_index_prefix(tenant: str, key: str, value: str | None = None) -> bytes:
    """Rows of one metadata key (any value), or of one exact key = value."""
    p = b"\x04" + enc_str(tenant) + enc_str(key)
    return p if value is None else p + enc_str(value)


def metadata_value_prefix(tenant: str, key: str, value_prefix: str) -> bytes:
    """Rows whose value starts with value_prefix (the value's terminator left off)."""
    b = value_prefix.encode()
    if 0 in b:
        b = b.replace(b"\x00", b"\x00\xff")
    return b"\x04" + enc_str(tenant) + enc_str(key) + b


def decode_metadata_index(key: bytes) -> tuple[str, str, str, str]:
    """(tenant, key, value, job_id) of a metadata index key."""
    tenant, pos = dec_str(key, 1)
    mkey, pos = dec_str(key, pos)
    value, pos = dec_str(key, pos)
    job_id, _ = dec_str(key, pos)
    return tenant, mkey, value, job_id


def _newest_first(ms: int) -> bytes:
    return enc_u64(_U64_MAX - max(0, ms))


def tenant_groups_prefix(tenant: str) -> bytes:
    """Every 0x10 row of a tenant, task group by task group."""
    return b"\x10" + enc_str(tenant)


def group_time_prefix(tenant: str, task_group: str) -> bytes:
    return b"\x10" + enc_str(tenant) + enc_str(task_group)


def metadata_time_prefix(tenant: str, key: str, value: str) -> bytes:
    return b"\x11" + enc_str(tenant) + enc_str(key) + enc_str(value)


def time_index_from(prefix: bytes, enqueue_ms: int) -> bytes:
    """First key under a 0x10/0x11 prefix (or a 0x03 (tenant, status) one: the same
    time-then-id tail) whose time is at or before enqueue_ms (newest first)."""
    return prefix + _newest_first(enqueue_ms)


def time_index_rows(tenant: str, job_id: str, enqueue_ms: int, task_group: str,
                    metadata: dict[str, str]) -> list[bytes]:
    """Every 0x10/0x11 key of one job."""
    tail = _newest_first(enqueue_ms) + enc_str(job_id)
    out = [group_time_prefix(tenant, task_group) + tail]
    out += [metadata_time_prefix(tenant, k, v) + tail for k, v in metadata.items()]
    return out


def new_job_index_rows(tenant: str, job_id: str, enqueue_ms: int, task_group: str,
                       metadata: dict[str, str]) -> list[bytes]:
    """Every 0x04 metadata index key of a new job, then its 0x10/0x11 keys: exactly
    `metadata_index(...)` per pair + `time_index_rows(...)`, with each string encoded
    once (this runs on every enqueue)."""
    t = enc_str(tenant)
    j = enc_str(job_id)
    tail = (_U64_MAX - max(0, enqueue_ms)).to_bytes(8, "big") + j
    out = []
    time_rows = [b"\x10" + t + enc_str(task_group) + tail]
    for k, v in metadata.items():
        kv = t + enc_str(k) + enc_str(v)
        out.append(b"\x04" + kv + j)
        time_rows.append(b"\x11" + kv + tail)
    out += time_rows
    return out


def decode_time_tail(key: bytes, prefix_len: int) -> tuple[int, str]:
    """(enqueue_ms, job_id) of a time index key, given its prefix's length."""
    ms = _U64_MAX - int.from_bytes(key[prefix_len : prefix_len + 8], "big")
    job_id, _ = dec_str(key, prefix_len + 8)
    return ms, job_id


def expiry_index(expire_at_ms: int, tenant: str, job_id: str) -> bytes:
    return b"\x0d" + enc_u64(max(0, expire_at_ms)) + enc_str(tenant) + enc_str(job_id)


def expiry_due_end(now_ms: int) -> bytes:
    """Exclusive end key of the expiry rows due at or before now_ms."""
    return b"\x0d" + enc_u64(max(0, now_ms) + 1)


def decode_expiry_index(key: bytes) -> tuple[int, str, str]:
    """(expire_at_ms, tenant, job_id) of an expiry index key."""
    at = int.from_bytes(key[1:9], "big")
    tenant, pos = dec_str(key, 9)
    job_id, _ = dec_str(key, pos)
    return at, tenant, job_id


# ---- ready queue -----------------------------------------------------------


def pending_pointer(tenant: str, job_id: str) -> bytes:
    """Where a Scheduled job's pending task is when its key cannot be derived from the
    job's status (silo.shard.pending)."""
    return b"\x0e" + enc_str(tenant) + enc_str(job_id)


def task_group_prefix(task_group: str) -> bytes:
    return b"\x05" + enc_str(task_group)


def task(
    task_group: str, start_ms: int, priority: int, job_id: str, attempt_number: int, tenant: str
) -> bytes:
    return (
        b"\x05"
        + enc_str(task_group)
        + enc_u64(max(0, start_ms))
        + bytes((priority,))
        + enc_str(job_id)
        + enc_u32(attempt_number)
        + enc_str(tenant)
    )


def task_start_ms(key: bytes, group_prefix_len: int) -> int:
    """Start time of a task key, given the length of its task-group prefix."""
    return int.from_bytes(key[group_prefix_len : group_prefix_len + 8], "big")


def decode_task(key: bytes) -> tuple[str, int, int, str, int, str]:
    """(task_group, start_ms, priority, job_id, attempt, tenant) of a task key."""
    if key[0] != TASK:
        raise ValueError("not a task key")
    group, pos = dec_str(key, 1)
    start = int.from_bytes(key[pos : pos + 8], "big")
    priority = key[pos + 8]
    job_id, pos = dec_str(key, pos + 9)
    attempt_number = int.from_bytes(key[pos : pos + 4], "big")
    tenant, _ = dec_str(key, pos + 4)
    return group, start, priority, job_id, attempt_number, tenant


# ---- limits ------------------------------------------------------------------


def concurrency_request(
    tenant: str, queue: str, start_ms: int, priority: int, job_id: str, attempt_number: int
) -> bytes:
    """A parked waiter; within one queue the keys sort in grant order."""
    return (
        b"\x08"
        + enc_str(tenant)
        + enc_str(queue)
        + enc_u64(max(0, start_ms))
        + bytes((priority,))
        + enc_str(job_id)
        + enc_u32(attempt_number)
    )


def concurrency_holder(tenant: str, queue: str, task_id: str) -> bytes:
    return b"\x09" + enc_str(tenant) + enc_str(queue) + enc_str(task_id)


def decode_concurrency_holder(key: bytes) -> tuple[str, str, str]:
    tenant, pos = dec_str(key, 1)
    queue, pos = dec_str(key, pos)
    task_id, _ = dec_str(key, pos)
    return tenant, queue, task_id


def floating_limit(tenant: str, queue: str) -> bytes:
    return b"\x0b" + enc_str(tenant) + enc_str(queue)


def rate_limit_bucket(name: str, unique_key: str) -> bytes:
    return b"\x0c" + enc_str(name) + enc_str(unique_key)


# ---- leases, counters, meta ------------------------------------------------


def lease(task_id: str) -> bytes:
    return b"\x06" + enc_str(task_id)


def shard_counter(name: str) -> bytes:
    return b"\xf0" + enc_str(name)


def tenant_status_counter(tenant: str, status: str) -> bytes:
    return b"\xf8" + enc_str(tenant) + enc_str(status)


def tenant_counts(tenant: str) -> bytes:
    return b"\xf9" + enc_str(tenant)


def decode_tenant_status_counter(key: bytes) -> tuple[str, str]:
    tenant, pos = dec_str(key, 1)
    status, _ = dec_str(key, pos)
    return tenant, status


def shard_meta(name: str) -> bytes:
    return b"\xfe" + enc_str(name)


def kind_prefix(kind: int) -> bytes:
    """The prefix holding every record of one kind."""
    return _prefix(kind)


def prefix_end(prefix: bytes) -> bytes | None:
    """Smallest key greater than every key starting with prefix (None: no bound)."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return None
    b[-1] += 1
    return bytes(b)
