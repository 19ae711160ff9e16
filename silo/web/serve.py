"""Start and stop the web UI inside a worker process.

Every worker process serves the web port, bound with SO_REUSEPORT exactly like the
gRPC port: the supervisor reserves the address before forking (so port 0 resolves to
one port for all, and a second server on the same port is refused), each worker binds
its own listening socket on its own event loop, and the kernel spreads connections.
So the UI stays up while any one worker restarts, pages cost no extra hop to reach a
serving process, and the supervisor never runs an event loop or opens a database. A
page that needs another worker's shard goes through the service's forwarding path.
"""

from __future__ import annotations

import logging

from aiohttp import web

from silo.config import Config
from silo.web.app import build_app
from silo.web.backend import Backend

log = logging.getLogger("silo.web")


class WebUI:
    def __init__(self, service, config: Config, addr: str, secret: bytes) -> None:
        self.addr = addr
        self.app = build_app(Backend(service), config, secret)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        host, _, port = self.addr.rpartition(":")
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True,
                           reuse_port=True, shutdown_timeout=2.0)
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
