"""What the server checks before a request reaches the app, and the headers every answer carries.

`Guard` is ASGI middleware: it refuses requests naming a host the server does not serve (DNS rebinding),
cross-site posts, requests without the bearer token where one is set, bodies over the size limit or too
slow to arrive, and closes the connection of every refusal (`Refused`). `security_headers` are the
Content-Security-Policy of 'self' and the other headers it adds to every answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

# the names a server on loopback answers to; "testserver" is the name Starlette's in-process test client sends
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "testserver")
# the answers that refuse a request outright: each closes its connection
REFUSALS = frozenset({400, 401, 403, 408, 413})


class Refused(Exception):
    """A request the server declines with `status` and a one-line `detail` (and optional headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def host_name(host_header: str) -> str:
    """The host name of a Host header or URL authority, without port, brackets or trailing dot, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


class Guard:
    """ASGI middleware in front of the app: refuses foreign Host headers (400), cross-site posts (403), requests
    without the token where one is set (401, except on `open_paths`), bodies over `limit` bytes (413, announced
    or chunked) and bodies not received within `body_timeout_s` (408). Every answer carries the security
    headers; a refusal, and any answer sent before the request's body was read to its end, closes the connection."""

    def __init__(self, app: Any, limit: int, allowed_hosts: Iterable[str] = LOCAL_HOSTS, body_timeout_s: float = 60,
                 token: str | None = None, open_paths: Iterable[str] = ("/", "/health"),
                 headers: Iterable[tuple[str, str]] = ()):
        self.app, self.limit, self.body_timeout_s = app, limit, body_timeout_s
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.token, self.open_paths = token, frozenset(open_paths)
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = BodyReader(receive, scope, self.limit, self.body_timeout_s, self.too_large())
        started = False

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": self.answer_headers(message, body.complete)}
            await send(message)

        try:
            self.check_headers(scope)
            await self.app(scope, body, guarded_send)
        except Refused as e:  # from the head, or raised while the body was read by a route that did not answer it
            if not started:
                await send_problem(guarded_send, e)

    def answer_headers(self, start: dict, body_read: bool) -> list[tuple[bytes, bytes]]:
        """The app's headers, the security headers it did not set, and `connection: close` for a refusal or
        an answer sent before the body was read to its end (the client may still be sending it)."""
        headers = list(start.get("headers") or [])
        names = {k.lower() for k, _ in headers}
        headers += [(k, v) for k, v in self.headers if k not in names]
        if (start["status"] in REFUSALS or not body_read) and b"connection" not in names:
            headers.append((b"connection", b"close"))
        return headers

    def check_headers(self, scope: dict) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host", "")
        if "*" not in self.allowed and host_name(host) not in self.allowed:
            raise Refused(400, f"host {host_name(host)!r} is not served here (start the server with --allow-host NAME)")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            site = headers.get("sec-fetch-site")
            origin = headers.get("origin")
            if (site is not None and site not in ("same-origin", "none")) or (
                    origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.lower())):
                raise Refused(403, "cross-site request refused: post from the server's own page or a non-browser client")
        if self.token is not None and route_path(scope) not in self.open_paths:
            check_bearer(headers.get("authorization"), self.token)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            raise Refused(413, self.too_large())

    def too_large(self) -> str:
        return f"upload too large: the limit is {self.limit / (1024 * 1024):g} MB per request"


def route_path(scope: dict) -> str:
    """The request's path below the server's root path (the path the routes match)."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root) else path


def check_bearer(authorization: str | None, token: str) -> None:
    """Refuse (401, with `WWW-Authenticate: Bearer`) an Authorization header that is not the bearer `token`;
    the scheme's name is case-insensitive (RFC 7235), the token is compared in constant time."""
    scheme, _, given = (authorization or "").strip().partition(" ")
    if not authorization:
        raise Refused(401, "missing API token: send 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": 'Bearer realm="pneumoscan"'})
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Refused(401, "wrong API token or scheme: send 'Authorization: Bearer <token>'",
                      {"WWW-Authenticate": 'Bearer realm="pneumoscan", error="invalid_token"'})


class BodyReader:
    """The request body as the app receives it (an ASGI `receive`): counted against `limit` (413), due within
    `timeout_s` of the head (408); `complete` once it was read to its end (at once for a request without one)."""

    def __init__(self, receive: Any, scope: dict, limit: int, timeout_s: float, too_large: str):
        self.receive, self.limit, self.timeout_s, self.too_large = receive, limit, timeout_s, too_large
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        headers = dict(scope.get("headers") or [])
        self.complete = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0").strip() in (b"", b"0")
        self.seen = 0

    async def __call__(self) -> dict:
        if self.complete:  # after the body, only the disconnect remains: no deadline on waiting for it
            return await self.receive()
        loop = asyncio.get_running_loop()
        try:
            message = await asyncio.wait_for(self.receive(), max(self.deadline - loop.time(), 0.001))
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive within {self.timeout_s:g} s") from None
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            raise Refused(413, self.too_large)
        self.complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message


async def send_problem(send: Any, e: Refused) -> None:
    body = json.dumps({"detail": e.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def content_security_policy(*pages: str) -> str:
    """Only the server's own files, plus the inline <script> and <style> blocks of `pages` by their SHA-256
    (so any change to them is refused until the server reads them again); images may also be data: and
    blob: URLs (the heatmaps and the uploads shown); no page may frame this one."""
    def hashes(tag: str) -> str:
        blocks = [b for page in pages for b in re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)]
        return "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (f"default-src 'self'; script-src 'self'{hashes('script')}; style-src 'self'{hashes('style')}; "
            "img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def security_headers(*pages: str) -> list[tuple[str, str]]:
    """The headers every answer carries: the Content-Security-Policy for `pages`, no MIME sniffing, no
    framing (for browsers that predate frame-ancestors too), no Referer sent from the page."""
    return [("Content-Security-Policy", content_security_policy(*pages)), ("X-Content-Type-Options", "nosniff"),
            ("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]
