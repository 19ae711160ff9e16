"""Who may see a page and who may press a button: the session and CSRF rules.

Stateless on purpose: every worker process serves the same port, so a browser's next
request may land on another process. All of them hold the same random secret (made by
the supervisor before forking), and every token is an HMAC under it, checked the same
way everywhere. A server restart makes a new secret, which logs everyone out.

- Session (only when `server.auth_token` is set): the login form checks the token and
  sets an HttpOnly, SameSite=Strict cookie holding HMAC(secret, token); scripts may
  instead send `Authorization: Bearer <token>`.
- CSRF: each browser gets a random HttpOnly `silo_csrf` cookie; every form carries
  HMAC(secret, that cookie). A cross-site page can neither read the cookie nor the
  form, so it cannot make a valid POST. A mismatched Origin header is refused too.
- Origin behind a reverse proxy: the browser's Origin names the proxy's address, which
  need not be the Host the proxy sends on. `webui.public_origin` names that address;
  with `webui.trust_forwarded`, X-Forwarded-Proto/Host name it per request (only a
  proxy that always overwrites them makes that safe).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SESSION_COOKIE = "silo_session"
CSRF_COOKIE = "silo_csrf"
CSRF_FIELD = "csrf"


def new_secret() -> bytes:
    return secrets.token_bytes(32)


def new_nonce() -> str:
    return secrets.token_urlsafe(18)


def _mac(secret: bytes, purpose: str, value: str) -> str:
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


def session_value(secret: bytes, auth_token: str) -> str:
    """The session cookie a correct login gets."""
    return _mac(secret, "session", auth_token)


def token_matches(auth_token: str, given: str) -> bool:
    return hmac.compare_digest(auth_token.encode(), given.encode())


def authenticated(secret: bytes, auth_token: str, cookie: str | None,
                  authorization: str | None) -> bool:
    """True when auth is off, the session cookie is valid, or the bearer token is right."""
    if not auth_token:
        return True
    if cookie and hmac.compare_digest(cookie, session_value(secret, auth_token)):
        return True
    if authorization and authorization.startswith("Bearer "):
        return token_matches(auth_token, authorization[len("Bearer "):])
    return False


def csrf_token(secret: bytes, nonce: str) -> str:
    """The hidden form field for the browser holding CSRF cookie `nonce`."""
    return _mac(secret, "csrf", nonce)


def csrf_ok(secret: bytes, nonce: str | None, field: str | None) -> bool:
    if not nonce or not field:
        return False
    return hmac.compare_digest(field, csrf_token(secret, nonce))


def _first(header: str | None) -> str:
    """The first value of a forwarded header (proxies append theirs after a comma)."""
    return (header or "").split(",")[0].strip().lower()


def same_origin(origin: str | None, host: str | None, *, public_origin: str = "",
                forwarded_host: str | None = None, forwarded_proto: str | None = None
                ) -> bool:
    """A browser's Origin header, when it sends one, must name this very host, or the
    configured public origin, or (only when the caller trusts them, i.e. passes them)
    the origin the X-Forwarded-* headers describe."""
    if not origin:
        return True  # older browsers and non-browser clients: the token decides
    origin = origin.strip().rstrip("/").lower()
    if public_origin and origin == public_origin:
        return True
    fwd_host = _first(forwarded_host)
    if fwd_host:
        proto = _first(forwarded_proto) or "http"
        if proto in ("http", "https") and origin == f"{proto}://{fwd_host}":
            return True
    if not host:
        return False
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and rest == host.lower()
