"""Key encodings: byte order must equal tuple order, and keys must round-trip."""

from hypothesis import given
from hypothesis import strategies as st

from silo.storage import keys

texts = st.text(max_size=20)
u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
u32 = st.integers(min_value=0, max_value=(1 << 32) - 1)
u8 = st.integers(min_value=0, max_value=99)


@given(texts, texts)
def test_string_order_is_preserved(a, b):
    ea, eb = keys.enc_str(a), keys.enc_str(b)
    assert (ea < eb) == (a.encode() < b.encode())
    assert (ea == eb) == (a == b)


@given(texts, texts, texts, texts)
def test_string_pairs_are_unambiguous(a, b, c, d):
    """Concatenated encodings compare like the tuples (no prefix confusion)."""
    assert (keys.enc_str(a) + keys.enc_str(b) < keys.enc_str(c) + keys.enc_str(d)) == (
        (a.encode(), b.encode()) < (c.encode(), d.encode()))


@given(texts)
def test_string_round_trip(s):
    assert keys.dec_str(keys.enc_str(s) + b"tail", 0) == (s, len(keys.enc_str(s)))


task_tuples = st.tuples(st.sampled_from(["g", "g2"]), u64, u8, texts, u32, texts)


@given(task_tuples, task_tuples)
def test_task_key_orders_by_start_then_priority_then_job(x, y):
    kx, ky = keys.task(*x), keys.task(*y)
    def norm(t):
        g, start, prio, job, att, tenant = t
        return (g.encode(), start, prio, job.encode(), att, tenant.encode())
    assert (kx < ky) == (norm(x) < norm(y))


@given(task_tuples)
def test_task_key_round_trip(t):
    key = keys.task(*t)
    assert keys.decode_task(key) == t
    assert keys.task_start_ms(key, len(keys.task_group_prefix(t[0]))) == t[1]
    assert key.startswith(keys.task_group_prefix(t[0]))


def test_earlier_start_beats_higher_priority():
    early_low = keys.task("g", 1000, 99, "a", 1, "-")
    late_high = keys.task("g", 1001, 0, "a", 1, "-")
    assert early_low < late_high


@given(texts, texts, u32, u32)
def test_attempts_sort_by_number_within_a_job(tenant, job, a, b):
    ka, kb = keys.attempt(tenant, job, a), keys.attempt(tenant, job, b)
    assert (ka < kb) == (a < b)
    assert ka.startswith(keys.attempts_prefix(tenant, job))


@given(st.binary(max_size=8))
def test_prefix_end_bounds_every_extension(p):
    end = keys.prefix_end(b"\x05" + p)
    assert end is None or (b"\x05" + p + b"\xff" * 4) < end


@given(texts, st.sampled_from(["Scheduled", "Running", "Failed"]), u64, texts)
def test_status_index_round_trip(tenant, status, ts, job):
    key = keys.status_index(tenant, status, ts, job)
    assert keys.decode_status_index(key) == (tenant, status, ts, job)
    assert key.startswith(keys.status_index_prefix(tenant, status))
    assert key.startswith(keys.status_index_prefix(tenant))


@given(texts, u64, u64, texts, texts)
def test_status_index_sorts_newest_first(tenant, t1, t2, j1, j2):
    k1 = keys.status_index(tenant, "Running", t1, j1)
    k2 = keys.status_index(tenant, "Running", t2, j2)
    if t1 != t2:
        assert (k1 < k2) == (t1 > t2)


@given(texts, texts, texts, texts)
def test_metadata_index_round_trip(tenant, k, v, job):
    key = keys.metadata_index(tenant, k, v, job)
    assert keys.decode_metadata_index(key) == (tenant, k, v, job)
    assert key.startswith(keys.metadata_index_prefix(tenant, k, v))
    assert key.startswith(keys.metadata_index_prefix(tenant, k))


@given(texts, texts, texts, texts, texts)
def test_metadata_value_prefix_matches_exactly_the_values_with_that_prefix(tenant, k, v, p, job):
    key = keys.metadata_index(tenant, k, v, job)
    assert key.startswith(keys.metadata_value_prefix(tenant, k, p)) == v.startswith(p)


@given(u64, texts, texts, u64)
def test_expiry_index_round_trip_and_due_bound(at, tenant, job, now):
    if at >= (1 << 64) - 1 or now >= (1 << 64) - 1:
        return
    key = keys.expiry_index(at, tenant, job)
    assert keys.decode_expiry_index(key) == (at, tenant, job)
    assert (key < keys.expiry_due_end(now)) == (at <= now)


@given(texts, texts, u64, texts, st.dictionaries(texts, texts, max_size=4))
def test_new_job_index_rows_equal_the_per_row_functions(tenant, job, ms, group, metadata):
    """The enqueue path's one-pass builder writes byte-for-byte the rows of
    metadata_index + time_index_rows (the index rows of layout 3 and later)."""
    expected = [keys.metadata_index(tenant, k, v, job) for k, v in metadata.items()]
    expected += keys.time_index_rows(tenant, job, ms, group, metadata)
    assert keys.new_job_index_rows(tenant, job, ms, group, metadata) == expected
