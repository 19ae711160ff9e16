"""What stands between raw request bytes and a handler: parsing after auth, bounded
error messages, and log lines an attacker cannot multiply.

The Silo service is registered with a raw-bytes deserializer (silo.rpc.server), so a
body that is not a valid protobuf reaches our code instead of failing inside grpcio
(which answered UNKNOWN and logged a traceback per call, before any auth check). The
rpc wrapper checks the token first, then parses here.
"""

from __future__ import annotations

import logging
import time

from google.protobuf.message import DecodeError, Message

from silo import errors

log = logging.getLogger(__name__)


class LogThrottle:
    """At most one log line per `interval_s`, saying how many events it stands for."""

    def __init__(self, logger: logging.Logger, level: int, interval_s: float) -> None:
        self._log = logger
        self._level = level
        self._interval = interval_s
        self._last = -float("inf")
        self._pending = 0

    def __call__(self, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        self._pending += 1
        now = time.monotonic()
        if now - self._last < self._interval:
            return
        n, self._pending, self._last = self._pending, 0, now
        self._log.log(self._level, msg + " (%d such since the last report)", *args, n,
                      exc_info=exc_info)


_undecodable = LogThrottle(log, logging.WARNING, 60.0)
unexpected = LogThrottle(log, logging.ERROR, 10.0)


def parse_request(request_type: type[Message], method: str, raw: bytes) -> Message:
    """The request message, or INVALID_ARGUMENT when the body does not parse."""
    try:
        return request_type.FromString(raw)
    except (DecodeError, ValueError, TypeError, RuntimeError):
        _undecodable("rejected an undecodable %s request body (%d bytes)", method, len(raw))
        raise errors.invalid(
            f"request body is not a valid {request_type.DESCRIPTOR.full_name} message"
        ) from None


def bounded(message: str) -> str:
    """An error message cut to MAX_MESSAGE_CHARS, whatever it quotes."""
    return errors.clip(message, errors.MAX_MESSAGE_CHARS)
