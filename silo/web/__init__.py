"""The operator web UI: server-rendered HTML pages and POST actions, served by every
worker process next to its gRPC server.

Layout: `serve` binds the port and builds the aiohttp application; `security` holds
the session and CSRF rules (pure functions); `backend` calls the gRPC service in
process, so a page sees exactly what a client sees; `view` turns replies into plain
values for templates; `pages_*` are the route handlers, one module per noun.
"""
