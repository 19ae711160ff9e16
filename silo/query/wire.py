"""Query results on the wire: msgpack rows, Arrow type names, Arrow IPC messages.

Rows are msgpack maps column → value with integers in their most compact msgpack
form (msgspec's encoding), so clients decode `priority` or `COUNT(*)` as plain
numbers; floats are f64, strings str, binary bin, null nil; complex values (the
metadata Map, lists, structs) are formatted to a string as DataFusion prints them.
"""

from __future__ import annotations

import datetime
import decimal

import msgspec
import pyarrow as pa
import pyarrow.types as pat

_enc = msgspec.msgpack.Encoder()

_SIMPLE = {
    pa.string(): "Utf8", pa.large_string(): "LargeUtf8", pa.string_view(): "Utf8View",
    pa.int8(): "Int8", pa.int16(): "Int16", pa.int32(): "Int32", pa.int64(): "Int64",
    pa.uint8(): "UInt8", pa.uint16(): "UInt16", pa.uint32(): "UInt32", pa.uint64(): "UInt64",
    pa.float16(): "Float16", pa.float32(): "Float32", pa.float64(): "Float64",
    pa.bool_(): "Boolean", pa.binary(): "Binary", pa.large_binary(): "LargeBinary",
    pa.binary_view(): "BinaryView", pa.null(): "Null", pa.date32(): "Date32",
    pa.date64(): "Date64",
}
_UNITS = {"s": "Second", "ms": "Millisecond", "us": "Microsecond", "ns": "Nanosecond"}


def type_name(t: pa.DataType) -> str:
    """The Arrow type's name as Rust's arrow prints it (what upstream sends)."""
    simple = _SIMPLE.get(t)
    if simple is not None:
        return simple
    if pat.is_map(t):
        return f"Map({type_name(t.key_type)}, {type_name(t.item_type)})"
    if pat.is_list(t) or pat.is_large_list(t):
        return f"List({type_name(t.value_type)})"
    if pat.is_timestamp(t):
        tz = f'Some("{t.tz}")' if t.tz else "None"
        return f"Timestamp({_UNITS[t.unit]}, {tz})"
    if pat.is_decimal(t):
        return f"Decimal{t.bit_width}({t.precision}, {t.scale})"
    if pat.is_struct(t):
        return "Struct(" + ", ".join(f"{f.name}: {type_name(f.type)}" for f in t) + ")"
    if pat.is_dictionary(t):
        return f"Dictionary({type_name(t.index_type)}, {type_name(t.value_type)})"
    return str(t)


def columns(schema: pa.Schema) -> list[tuple[str, str]]:
    return [(f.name, type_name(f.type)) for f in schema]


def _text(v, t: pa.DataType) -> str:
    if v is None:
        return "NULL"
    if pat.is_map(t):
        return "{" + ", ".join(f"{_text(k, t.key_type)}: {_text(x, t.item_type)}"
                               for k, x in v) + "}"
    if pat.is_list(t) or pat.is_large_list(t):
        return "[" + ", ".join(_text(x, t.value_type) for x in v) + "]"
    if pat.is_struct(t):
        return "{" + ", ".join(f"{f.name}: {_text(v.get(f.name), f.type)}" for f in t) + "}"
    return str(v)


def _plain(t: pa.DataType) -> bool:
    return (pat.is_integer(t) or pat.is_floating(t) or pat.is_boolean(t) or pat.is_string(t)
            or pat.is_large_string(t) or t == pa.string_view() or pat.is_binary(t)
            or pat.is_large_binary(t) or pat.is_null(t))


def _scalar(v):
    if isinstance(v, datetime.datetime | datetime.date | datetime.time | decimal.Decimal
                  | datetime.timedelta):
        return str(v)
    return v


def rows(table: pa.Table) -> list[bytes]:
    """Each row as a msgpack map column-name → value."""
    names = table.column_names
    cols = []
    for name, f in zip(names, table.schema, strict=True):
        values = table.column(name).to_pylist()
        if not _plain(f.type):
            if pat.is_map(f.type) or pat.is_list(f.type) or pat.is_large_list(f.type) or \
                    pat.is_struct(f.type):
                values = [None if v is None else _text(v, f.type) for v in values]
            else:
                values = [_scalar(v) for v in values]
        cols.append(values)
    return [_enc.encode(dict(zip(names, r, strict=True))) for r in zip(*cols, strict=True)]


def ipc_messages(table: pa.Table) -> list[bytes]:
    """One self-contained Arrow IPC stream (schema + one batch + end) per batch."""
    out = []
    for batch in table.to_batches():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_batch(batch)
        out.append(sink.getvalue().to_pybytes())
    return out


def ipc_table(table: pa.Table) -> bytes:
    """A whole table as one Arrow IPC stream (between processes)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
