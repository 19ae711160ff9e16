"""A tiny cookie-keeping HTTP client for the web UI tests (urllib, no redirects followed
unless asked), and the form-token scraping a browser would do."""

from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


@dataclass
class Page:
    status: int
    body: str
    headers: dict[str, str]

    @property
    def location(self) -> str:
        return self.headers.get("location", "")

    def csrf(self) -> str:
        m = CSRF.search(self.body)
        assert m, "no CSRF field on the page"
        return m.group(1)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


class WebClient:
    def __init__(self, addr: str, headers: dict[str, str] | None = None) -> None:
        self.base = f"http://{addr}"
        self.jar = http.cookiejar.CookieJar()
        self.headers = headers or {}
        self._plain = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect)

    def request(self, method: str, path: str, data: dict[str, str] | None = None,
                headers: dict[str, str] | None = None, follow: bool = True) -> Page:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        for _ in range(5):
            req = urllib.request.Request(self.base + path, data=body, method=method,
                                         headers={**self.headers, **(headers or {})})
            try:
                with self._plain.open(req, timeout=30) as r:
                    page = Page(r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()})
            except urllib.error.HTTPError as e:
                page = Page(e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()})
            if not (follow and page.status in (301, 302, 303, 307) and page.location):
                return page
            path, method, body = page.location, "GET", None
        raise AssertionError("redirect loop")

    def get(self, path: str, **kw) -> Page:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, str], **kw) -> Page:
        return self.request("POST", path, data, **kw)

    def post_form(self, page_path: str, action: str, data: dict[str, str], **kw) -> Page:
        """Load `page_path`, take its CSRF token, and POST `data` to `action`."""
        token = self.get(page_path).csrf()
        return self.post(action, {**data, "csrf": token}, **kw)
