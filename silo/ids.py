"""Random UUIDv4 strings for job and task ids, cheaply.

`uuid.uuid4()` reads the OS entropy pool and builds a UUID object: ≈7 µs, twice per
enqueue. Ids only need to be unique, not secret, so they come from the `random`
module's generator (seeded from the OS, reseeded in forked children by CPython),
formatted as a standard RFC 4122 version-4 UUID string.
"""

from __future__ import annotations

from random import getrandbits

_VERSION_BITS = 0x4 << 76 | 0x2 << 62
_CLEAR = ~(0xF << 76 | 0x3 << 62)


def new_id() -> str:
    """A random UUIDv4 as 36 lowercase characters."""
    h = "%032x" % ((getrandbits(128) & _CLEAR) | _VERSION_BITS)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
