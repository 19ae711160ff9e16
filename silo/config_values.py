"""The per-option value parsers of the server configuration, and its error type.

A parser takes a raw value (a str from the environment or argv, or a native TOML value) and
returns the typed value, or raises :class:`Bad` saying what is expected; ``Option.coerce`` in
:mod:`silo.config` turns that into a one-line :class:`ConfigError` naming the option. The
option table itself lives in :mod:`silo.config`; this module holds no option.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable


class ConfigError(Exception):
    """Invalid configuration. ``str(err)`` is a single line, printed as ``silo: <message>``."""


def one_line(text: str) -> str:
    """``text`` with its newlines folded, so an error message stays on one line."""
    return " ".join(text.split("\n"))



Parser = Callable[[object], object]


class Bad(Exception):
    """A raw value a parser rejects; its message says what is expected."""


def integer(lo: int, hi: int | None = None, *, unit: str = "") -> Parser:
    if hi is None:
        expect = f"must be an integer >= {lo}{unit}"
    else:
        expect = f"must be an integer between {lo} and {hi}"

    def parse(raw: object) -> int:
        if isinstance(raw, str):
            try:
                raw = int(raw.strip())
            except ValueError:
                raise Bad(expect) from None
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise Bad(expect)
        if raw < lo or (hi is not None and raw > hi):
            raise Bad(expect)
        return raw

    return parse


def number(lo: float, hi: float) -> Parser:
    expect = f"must be a number between {lo:g} and {hi:g}"

    def parse(raw: object) -> float:
        if isinstance(raw, str):
            try:
                raw = float(raw.strip())
            except ValueError:
                raise Bad(expect) from None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise Bad(expect)
        value = float(raw)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise Bad(expect)
        return value

    return parse


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        word = raw.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise Bad("must be a boolean (true/false, 1/0, yes/no, on/off)")


def choice(*values: str) -> Parser:
    expect = "must be one of " + ", ".join(values)

    def parse(raw: object) -> str:
        if isinstance(raw, str) and raw.strip().lower() in values:
            return raw.strip().lower()
        raise Bad(expect)

    return parse


_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")  # hostname or IPv4 literal
_PORT_RE = re.compile(r"[0-9]{1,5}")


def address(*, allow_empty: bool) -> Parser:
    expect = "must be HOST:PORT with a port between 0 and 65535 (IPv6 as [::1]:7450)"
    if allow_empty:
        expect = "must be empty or HOST:PORT with a port between 0 and 65535 (IPv6 as [::1]:7450)"

    def parse(raw: object) -> str:
        if not isinstance(raw, str):
            raise Bad(expect)
        if raw == "" and allow_empty:
            return raw
        host, sep, port = raw.rpartition(":")
        if not sep or not _PORT_RE.fullmatch(port) or int(port) > 65535:
            raise Bad(expect)
        if host.startswith("[") and host.endswith("]"):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                raise Bad(expect) from None
        elif not _HOST_RE.fullmatch(host):
            raise Bad(expect)
        return raw

    return parse


def path(raw: object) -> str:
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise Bad("must be a non-empty directory path")
    return os.path.expanduser(raw)


_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def url(raw: object) -> str:
    expect = "must be empty or a URL like file:///abs/path, memory:///, s3://bucket/prefix"
    if not isinstance(raw, str):
        raise Bad(expect)
    if raw == "":
        return raw
    m = _URL_RE.fullmatch(raw)
    if not m or (m[1].lower() == "file" and not m[2].startswith("/")):
        raise Bad(expect)
    return raw


_ORIGIN_RE = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(:[0-9]{1,5})?")


def origin(raw: object) -> str:
    """An HTTP origin (scheme://host[:port], no path), lower-cased, or ""."""
    expect = "must be empty or an origin like https://silo.example.com[:PORT] (no path)"
    if not isinstance(raw, str):
        raise Bad(expect)
    value = raw.strip().rstrip("/").lower()
    if value and not _ORIGIN_RE.fullmatch(value):
        raise Bad(expect)
    return value


def token(raw: object) -> str:
    # Must fit in an HTTP/2 header value after "Bearer ".
    if not isinstance(raw, str) or any(not "!" <= ch <= "~" for ch in raw):
        raise Bad("must be printable ASCII without spaces")
    return raw
