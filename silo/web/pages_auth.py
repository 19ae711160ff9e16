"""Login and logout (only meaningful when `server.auth_token` is set)."""

from __future__ import annotations

from aiohttp import web

from silo.web import security
from silo.web.app import CONFIG, SECRET, param, redirect, render

routes = web.RouteTableDef()


def _safe_next(target: str) -> str:
    """Only a local path: never send a fresh login to another site."""
    if target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", title="Log in", next=_safe_next(param(
        request, "next", max_len=2000)), error="")


@routes.post("/login")
async def login(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    target = _safe_next(param(request, "next", max_len=2000))
    token = param(request, "token", max_len=4096)
    if not config.auth_token:
        return redirect(target)
    if not security.token_matches(config.auth_token, token):
        return render(request, "login.html", status=401, title="Log in", next=target,
                      error="wrong token")
    resp = redirect(target)
    resp.set_cookie(security.SESSION_COOKIE,
                    security.session_value(request.app[SECRET], config.auth_token),
                    httponly=True, samesite="Strict", path="/")
    return resp


@routes.post("/logout")
async def logout(request: web.Request) -> web.Response:
    resp = redirect("/login")
    resp.del_cookie(security.SESSION_COOKIE, path="/")
    return resp
