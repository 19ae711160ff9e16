"""The aiohttp application: middlewares (auth, CSRF, errors, headers) and rendering.

Every response goes through `render` (one base layout, Jinja2 autoescape on, so user
text — payloads, metadata, errors — is always escaped) or a redirect. No handler can
leak a traceback: anything unexpected is logged and shown as a plain 500 page.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from silo.config import Config
from silo.web import security
from silo.web.backend import Backend, BackendError

log = logging.getLogger("silo.web")

HERE = Path(__file__).parent
FLASH_COOKIE = "silo_flash"
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

BACKEND = web.AppKey("backend", Backend)
CONFIG = web.AppKey("config", Config)
SECRET = web.AppKey("secret", bytes)
JINJA = web.AppKey("jinja", jinja2.Environment)


class PageError(Exception):
    """A request the UI cannot serve (bad or missing parameter): a 4xx page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> PageError:
    return PageError(400, message)


def param(request: web.Request, name: str, *, required: bool = False,
          max_len: int = 256) -> str:
    """A query (or, for POST, form) parameter, stripped; bounded in length."""
    form = request.get("form") or {}
    value = form.get(name, request.query.get(name, ""))
    value = value.strip() if isinstance(value, str) else ""
    if required and not value:
        raise bad_request(f"missing parameter: {name}")
    if len(value) > max_len:
        raise bad_request(f"parameter {name} is too long (max {max_len} characters)")
    return value


def url(path: str, **query: str | None) -> str:
    q = {k: v for k, v in query.items() if v}
    return path + ("?" + urlencode(q) if q else "")


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    app = request.app
    backend = app[BACKEND]
    nonce = request["csrf_nonce"]
    flash = request.get("flash")
    body = app[JINJA].get_template(template).render(
        request_path=request.path,
        csrf_field=security.CSRF_FIELD,
        csrf=security.csrf_token(app[SECRET], nonce),
        tenancy=backend.node.tenancy,
        auth_on=bool(app[CONFIG].auth_token),
        flash=flash,
        url=url,
        **ctx)
    resp = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    if flash is not None:
        resp.del_cookie(FLASH_COOKIE, path="/")
    return resp


def redirect(location: str, *, ok: bool | None = None, text: str = "") -> web.Response:
    """A POST's answer: go to `location` and show `text` there once (a flash cookie)."""
    resp = web.Response(status=303, headers={"Location": location})
    if ok is not None:
        data = base64.urlsafe_b64encode(json.dumps({"ok": ok, "text": text[:2000]}).encode())
        resp.set_cookie(FLASH_COOKIE, data.decode(), httponly=True, samesite="Strict",
                        path="/", max_age=60)
    return resp


def _read_flash(request: web.Request) -> dict[str, Any] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(raw.encode()))
        return {"ok": bool(doc["ok"]), "text": str(doc["text"])}
    except (ValueError, KeyError, TypeError):
        return None


def error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    return render(request, "error.html", status=status, title=title, message=message)


def _public(path: str) -> bool:
    """Paths anyone may fetch: the login form and what it needs to display."""
    return path == "/login" or path.startswith("/static/")


@web.middleware
async def guard(request: web.Request, handler) -> web.StreamResponse:
    """Session, CSRF and error handling for every request."""
    app = request.app
    secret = app[SECRET]
    fresh_nonce = None
    nonce = request.cookies.get(security.CSRF_COOKIE, "")
    if not nonce or len(nonce) > 64:
        nonce = fresh_nonce = security.new_nonce()
    request["csrf_nonce"] = nonce
    request["flash"] = _read_flash(request)
    try:
        resp = await _guarded(request, handler, secret)
    except web.HTTPException as e:
        if e.status == 404:
            resp = error_page(request, 404, "Not found", f"no page at {request.path}")
        elif e.status == 405:
            resp = error_page(request, 405, "Method not allowed",
                              f"{request.method} is not allowed on {request.path}")
        else:
            resp = web.Response(status=e.status, text=e.text or e.reason,
                                headers={k: v for k, v in e.headers.items()
                                         if k.lower() == "location"})
    except PageError as e:
        resp = error_page(request, e.status, "Bad request" if e.status == 400 else "Error",
                          e.message)
    except BackendError as e:
        resp = error_page(request, e.http_status, e.code.name, e.message)
    except Exception:  # noqa: BLE001 - a page must never show a traceback
        log.exception("web ui: %s %s failed", request.method, request.path)
        resp = error_page(request, 500, "Internal error",
                          "the server failed to render this page; see its log")
    if fresh_nonce is not None:
        resp.set_cookie(security.CSRF_COOKIE, fresh_nonce, httponly=True, samesite="Strict",
                        path="/")
    resp.headers.setdefault("Content-Security-Policy", CSP)
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        resp.headers.setdefault("Cache-Control", "no-store")
    return resp


async def _guarded(request: web.Request, handler, secret: bytes) -> web.StreamResponse:
    app = request.app
    token = app[CONFIG].auth_token
    if not _public(request.path) and not security.authenticated(
            secret, token, request.cookies.get(security.SESSION_COOKIE),
            request.headers.get("Authorization")):
        if request.method in ("GET", "HEAD"):
            return redirect("/login?next=" + quote(request.path_qs, safe=""))
        return error_page(request, 401, "Login required",
                          "this server needs its auth token; log in first")
    if request.method == "POST":
        config = app[CONFIG]
        trust = config.webui_trust_forwarded
        if not security.same_origin(
                request.headers.get("Origin"), request.host,
                public_origin=config.webui_public_origin,
                forwarded_host=request.headers.get("X-Forwarded-Host") if trust else None,
                forwarded_proto=request.headers.get("X-Forwarded-Proto") if trust else None):
            return error_page(request, 403, "Forbidden", "cross-origin form refused")
        form = await request.post()
        request["form"] = form
        field = form.get(security.CSRF_FIELD)
        if not security.csrf_ok(secret, request.cookies.get(security.CSRF_COOKIE),
                                field if isinstance(field, str) else None):
            return error_page(request, 403, "Forbidden",
                              "the form's CSRF token is missing or stale; reload the page "
                              "and try again")
    return await handler(request)


def build_app(backend: Backend, config: Config, secret: bytes) -> web.Application:
    from silo.web import (  # noqa: PLC0415
        pages_auth,
        pages_cluster,
        pages_groups,
        pages_job,
        pages_jobs,
        pages_queues,
        pages_sql,
        pages_tenant,
    )

    app = web.Application(middlewares=[guard], client_max_size=1024 * 1024)
    app[BACKEND] = backend
    app[CONFIG] = config
    app[SECRET] = secret
    app[JINJA] = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
        lstrip_blocks=True)
    for module in (pages_cluster, pages_job, pages_jobs, pages_queues, pages_groups,
                   pages_tenant, pages_sql, pages_auth):
        app.router.add_routes(module.routes)
    app.router.add_static("/static/", HERE / "static", append_version=False)
    return app
