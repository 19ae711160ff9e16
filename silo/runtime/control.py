"""The control channel between the supervisor and one worker: a socketpair, one byte
per message.

Supervisor → worker: PING (answer PONG: the liveness check, answered by the worker's
event loop, so a stopped or wedged loop misses it), DRAIN (stop taking public calls and
finish those in flight), CLOSE (every worker has drained: stop serving forwarded calls,
close the shards, exit). Worker → supervisor: SERVING (its shards are open and gRPC
serves; the web UI may still be starting), READY (everything serves), PONG, DRAINED.

The worker sees the supervisor's death as end-of-file and closes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

log = logging.getLogger(__name__)

PING = b"p"
PONG = b"P"
SERVING = b"S"
READY = b"R"
DRAIN = b"d"
DRAINED = b"D"
CLOSE = b"c"


class WorkerControl:
    """The worker's end, driven by its event loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.drain = asyncio.Event()
        self.close = asyncio.Event()
        self.supervisor_gone = False
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 256)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the supervisor is gone: nobody will coordinate a stop
            self.supervisor_gone = True
            asyncio.get_running_loop().remove_reader(self.fd)
            self.drain.set()
            self.close.set()
            return
        for b in data:
            msg = bytes((b,))
            if msg == PING:
                self.send(PONG)
            elif msg == DRAIN:
                self.drain.set()
            elif msg == CLOSE:
                self.drain.set()
                self.close.set()

    def send(self, msg: bytes) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError included: pings are idempotent
            os.write(self.fd, msg)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.fd)
