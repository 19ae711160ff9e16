"""Writing pprof profiles (github.com/google/pprof `profile.proto`) from stack samples.

The message types are built at import from a descriptor written here (the schema is
small and stable), in a private descriptor pool, so no generated module is needed.
`build` takes samples as (stack root-first, values, labels) and returns the gzipped
serialized Profile that `go tool pprof`, speedscope and pprof.me read.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterable, Sequence

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_T = descriptor_pb2.FieldDescriptorProto

# (message, [(field, number, type, repeated, message type name)])
_SCHEMA = {
    "Profile": [("sample_type", 1, "ValueType", True), ("sample", 2, "Sample", True),
                ("mapping", 3, "Mapping", True), ("location", 4, "Location", True),
                ("function", 5, "Function", True), ("string_table", 6, _T.TYPE_STRING, True),
                ("drop_frames", 7, _T.TYPE_INT64, False),
                ("keep_frames", 8, _T.TYPE_INT64, False),
                ("time_nanos", 9, _T.TYPE_INT64, False),
                ("duration_nanos", 10, _T.TYPE_INT64, False),
                ("period_type", 11, "ValueType", False), ("period", 12, _T.TYPE_INT64, False),
                ("comment", 13, _T.TYPE_INT64, True),
                ("default_sample_type", 14, _T.TYPE_INT64, False)],
    "ValueType": [("type", 1, _T.TYPE_INT64, False), ("unit", 2, _T.TYPE_INT64, False)],
    "Sample": [("location_id", 1, _T.TYPE_UINT64, True), ("value", 2, _T.TYPE_INT64, True),
               ("label", 3, "Label", True)],
    "Label": [("key", 1, _T.TYPE_INT64, False), ("str", 2, _T.TYPE_INT64, False),
              ("num", 3, _T.TYPE_INT64, False), ("num_unit", 4, _T.TYPE_INT64, False)],
    "Mapping": [("id", 1, _T.TYPE_UINT64, False), ("memory_start", 2, _T.TYPE_UINT64, False),
                ("memory_limit", 3, _T.TYPE_UINT64, False),
                ("file_offset", 4, _T.TYPE_UINT64, False), ("filename", 5, _T.TYPE_INT64, False),
                ("build_id", 6, _T.TYPE_INT64, False),
                ("has_functions", 7, _T.TYPE_BOOL, False),
                ("has_filenames", 8, _T.TYPE_BOOL, False),
                ("has_line_numbers", 9, _T.TYPE_BOOL, False),
                ("has_inline_frames", 10, _T.TYPE_BOOL, False)],
    "Location": [("id", 1, _T.TYPE_UINT64, False), ("mapping_id", 2, _T.TYPE_UINT64, False),
                 ("address", 3, _T.TYPE_UINT64, False), ("line", 4, "Line", True),
                 ("is_folded", 5, _T.TYPE_BOOL, False)],
    "Line": [("function_id", 1, _T.TYPE_UINT64, False), ("line", 2, _T.TYPE_INT64, False)],
    "Function": [("id", 1, _T.TYPE_UINT64, False), ("name", 2, _T.TYPE_INT64, False),
                 ("system_name", 3, _T.TYPE_INT64, False), ("filename", 4, _T.TYPE_INT64, False),
                 ("start_line", 5, _T.TYPE_INT64, False)],
}
PACKAGE = "perftools.profiles"


def _build_classes() -> dict[str, type]:
    fdp = descriptor_pb2.FileDescriptorProto(name="silo_pprof_profile.proto", package=PACKAGE,
                                             syntax="proto3")
    for msg, fields in _SCHEMA.items():
        m = fdp.message_type.add(name=msg)
        for name, number, typ, repeated in fields:
            f = m.field.add(name=name, number=number,
                            label=_T.LABEL_REPEATED if repeated else _T.LABEL_OPTIONAL)
            if isinstance(typ, str):
                f.type = _T.TYPE_MESSAGE
                f.type_name = f".{PACKAGE}.{typ}"
            else:
                f.type = typ
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in _SCHEMA}


_CLASSES = _build_classes()
Profile = _CLASSES["Profile"]

Frame = tuple[str, str, int]  # (function name, file name, line)
Sample = tuple[Sequence[Frame], Sequence[int], dict[str, str]]  # stack root-first


def build(samples: Iterable[Sample], sample_types: Sequence[tuple[str, str]], *,
          period_type: tuple[str, str] | None = None, period: int = 0,
          duration_ns: int = 0) -> bytes:
    """A gzipped pprof Profile of the given samples."""
    strings: dict[str, int] = {"": 0}

    def s(text: str) -> int:
        i = strings.get(text)
        if i is None:
            i = strings[text] = len(strings)
        return i

    prof = Profile()
    for typ, unit in sample_types:
        prof.sample_type.add(type=s(typ), unit=s(unit))
    functions: dict[tuple[str, str], int] = {}
    locations: dict[Frame, int] = {}
    for stack, values, labels in samples:
        loc_ids = []
        for frame in reversed(stack):  # pprof lists the leaf first
            loc = locations.get(frame)
            if loc is None:
                name, filename, line = frame
                fn = functions.get((name, filename))
                if fn is None:
                    fn = functions[(name, filename)] = len(functions) + 1
                    prof.function.add(id=fn, name=s(name), system_name=s(name),
                                      filename=s(filename))
                loc = locations[frame] = len(locations) + 1
                prof.location.add(id=loc).line.add(function_id=fn, line=line)
            loc_ids.append(loc)
        sample = prof.sample.add(location_id=loc_ids, value=list(values))
        for k, v in labels.items():
            sample.label.add(key=s(k), str=s(v))
    if period_type is not None:
        prof.period_type.type = s(period_type[0])
        prof.period_type.unit = s(period_type[1])
        prof.period = period
    prof.time_nanos = time.time_ns() - duration_ns
    prof.duration_nanos = duration_ns
    prof.string_table.extend(strings)  # dicts keep insertion order = index order
    return gzip.compress(prof.SerializeToString())


def parse(data: bytes):
    """Decode a (gzipped or plain) pprof profile; for tests and the CLI."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return Profile.FromString(data)
