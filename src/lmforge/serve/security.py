"""What `lmforge serve` checks on every request before a route sees it.

`RequestGuard` is a plain ASGI middleware (it never buffers a body itself):

1. **Host** must be one of `allowed_hosts` (400 otherwise): a page on another site whose
   DNS name was rebound to 127.0.0.1 sends its own name as Host and is refused.
2. Behind a **trusted reverse proxy** (`forwarded_allow_ips`), the scheme, host and client
   address come from ``X-Forwarded-Proto/Host/For``; from anyone else those headers are ignored.
3. **Unsafe methods** (POST, …) are refused (403) when the browser says the request is
   cross-site (``Sec-Fetch-Site``) or its ``Origin`` is neither the app's own origin nor
   one of `allowed_origins`. ``Origin: null`` is let through: browsers send it for the
   app's own forms because of ``Referrer-Policy: no-referrer``; the CSRF token checks those.
4. **Bodies** are bounded per route (`BODY_RULES`): a ``Content-Length`` over the limit
   gets 413 before anything is read; a chunked body is counted as it streams and reading
   stops at the limit (413). A route for organisers or annotators refuses a request
   without a live session or invitation cookie (403) before reading its body.
   ``Content-Encoding`` other than identity is refused (415): the app decodes none.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from lmforge.serve.store import Store

ORG_COOKIE = "lmforge_org"  # an organiser session id (never the token itself)
ANN_COOKIE = "lmforge_annotator"  # an annotator's invitation token

KiB = 1024
MiB = 1024 * KiB
DEFAULT_BODY_LIMIT = 64 * KiB
# A new study: the prompt file may be up to 8,000,000 bytes (studies.MAX_UPLOAD_BYTES), plus
# typed prompts and the multipart framing.
UPLOAD_BODY_LIMIT = 9 * MiB


@dataclass(frozen=True)
class BodyRule:
    method: str
    path: re.Pattern[str]
    max_bytes: int
    who: str  # "organiser" | "annotator" | "api" | "anyone": who must be signed in


def _rule(method: str, path: str, max_bytes: int, who: str) -> BodyRule:
    return BodyRule(method, re.compile(path), max_bytes, who)


# Every route that takes a body. Anything else may send at most DEFAULT_BODY_LIMIT.
BODY_RULES = (
    _rule("POST", r"/login", 4 * KiB, "anyone"),
    _rule("POST", r"/logout", 4 * KiB, "anyone"),
    _rule("POST", r"/studies", UPLOAD_BODY_LIMIT, "organiser"),
    _rule("POST", r"/studies/[^/]+/annotators", DEFAULT_BODY_LIMIT, "organiser"),
    _rule("POST", r"/arena/[^/]+/vote", DEFAULT_BODY_LIMIT, "annotator"),
    # 200 messages of a conversation with a small model's context fit in far less.
    _rule("POST", r"/api/chat/stream", 256 * KiB, "organiser"),
    # OpenAI-compatible API (openai_api.py): a bearer organiser token, checked before reading.
    _rule("POST", r"/v1/completions", 256 * KiB, "api"),
    _rule("POST", r"/v1/chat/completions", 256 * KiB, "api"),
)
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def body_rule(method: str, path: str) -> BodyRule | None:
    for rule in BODY_RULES:
        if rule.method == method and rule.path.fullmatch(path):
            return rule
    return None


@dataclass
class SecuritySettings:
    """What `lmforge serve --allowed-hosts/--allowed-origins/--forwarded-allow-ips/
    --session-hours` set. ``"*"`` in `allowed_hosts` or `forwarded_allow_ips` means any."""

    allowed_hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1")
    allowed_origins: Sequence[str] = ()
    forwarded_allow_ips: Sequence[str] = ()
    session_hours: float = 12.0
    hosts: set[str] = field(init=False)
    origins: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.hosts = {h.strip().lower().strip("[]") for h in self.allowed_hosts if h.strip()}
        self.origins = {normal_origin(o) for o in self.allowed_origins if o.strip()}

    def trusts(self, client_ip: str) -> bool:
        return "*" in self.forwarded_allow_ips or client_ip in self.forwarded_allow_ips


def host_name(host: str) -> str:
    """``Example.org:8000`` → ``example.org``; ``[::1]:8000`` → ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def normal_origin(origin: str) -> str:
    """``HTTPS://Example.org:443/`` → ``https://example.org`` (default port dropped)."""
    origin = origin.strip().lower().rstrip("/")
    scheme, _, host = origin.partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    return f"{scheme}://{host}"


def bearer_token(authorization: str) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header ("" for any other scheme)."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def cookies_of(headers: dict[str, str]) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except CookieError:
        return {}
    return {k: m.value for k, m in jar.items()}


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a streamed body passes its route's limit."""


class RequestGuard:
    """ASGI middleware: host, forwarded headers, origin, body size and early authentication."""

    def __init__(
        self,
        app: Any,
        settings: SecuritySettings,
        store: Store,
        refuse: Callable[[Request, int, str], Response],
    ):
        self.app, self.settings, self.store, self.refuse = app, settings, store, refuse

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            scope = self.apply_forwarded(scope)
            headers = first_headers(scope["headers"])
            self.check_host(headers)
            if scope["method"] not in SAFE_METHODS:
                self.check_origin(scope, headers)
            rule = body_rule(scope["method"], scope["path"])
            limit = rule.max_bytes if rule else DEFAULT_BODY_LIMIT
            if rule is not None and rule.who != "anyone":
                await self.check_signed_in(rule.who, cookies_of(headers), headers)
            check_body_headers(headers, limit)
        except Refused as exc:
            response = await anyio.to_thread.run_sync(
                self.refuse, Request(scope), exc.status, exc.message
            )
            await response(scope, receive, closing(send))
            return
        tripped: list[bool] = []
        await self.app(scope, bounded(receive, limit, tripped), closing(send, tripped))

    def apply_forwarded(self, scope: dict) -> dict:
        """The request as the client sent it to a trusted proxy (scheme, Host, client)."""
        client_ip = (scope.get("client") or ("", 0))[0]
        if not self.settings.trusts(client_ip):
            return scope
        headers = dict(scope["headers"])
        scope = dict(scope)
        if proto := headers.get(b"x-forwarded-proto"):
            scheme = proto.decode("latin-1").split(",")[-1].strip().lower()
            if scheme in ("http", "https"):
                scope["scheme"] = scheme
        if fwd_host := headers.get(b"x-forwarded-host"):
            host = fwd_host.split(b",")[-1].strip()
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"]
            scope["headers"].append((b"host", host))
        if fwd_for := headers.get(b"x-forwarded-for"):
            scope["client"] = (fwd_for.decode("latin-1").split(",")[-1].strip(), 0)
        return scope

    def check_host(self, headers: dict[str, str]) -> None:
        host = headers.get("host", "")
        if "*" in self.settings.hosts:
            return
        if host_name(host) not in self.settings.hosts:
            raise Refused(
                400,
                f"Host {host[:100]!r} is not served here (allowed: "
                f"{', '.join(sorted(self.settings.hosts))}; lmforge serve --allowed-hosts adds more).",
            )

    def check_origin(self, scope: dict, headers: dict[str, str]) -> None:
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            raise Refused(403, "Cross-origin request refused (Sec-Fetch-Site: cross-site).")
        origin = headers.get("origin")
        if not origin or origin == "null":
            return
        own = normal_origin(f"{scope['scheme']}://{headers.get('host', '')}")
        if normal_origin(origin) not in self.settings.origins | {own}:
            raise Refused(
                403,
                f"Cross-origin request refused (Origin {origin[:100]}; this app is {own}). "
                "Behind a reverse proxy, start lmforge serve with --allowed-origins.",
            )

    async def check_signed_in(
        self, who: str, cookies: dict[str, str], headers: dict[str, str]
    ) -> None:
        if who == "api":
            bearer = bearer_token(headers.get("authorization", ""))
            if not await anyio.to_thread.run_sync(self.store.is_organiser, bearer):
                raise Refused(401, "Send Authorization: Bearer <organiser token of this server>.")
            return
        if who == "organiser":
            ok = await anyio.to_thread.run_sync(self.store.session_valid, cookies.get(ORG_COOKIE))
            message = "This is for study organisers. Sign in with an organiser token at /login."
        else:
            ann = await anyio.to_thread.run_sync(self.store.annotator, cookies.get(ANN_COOKIE))
            ok = ann is not None
            message = "You need this study's invitation link to annotate it."
        if not ok:
            raise Refused(403, message)


def first_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Headers by lower-case name, first value wins (as in Starlette's `request.headers`);
    a repeated Host, Origin, Content-Length or Cookie is refused: its parts could disagree."""
    headers: dict[str, str] = {}
    for k, v in raw:
        name = k.decode("latin-1").lower()
        if name in headers and name in ("host", "origin", "content-length", "cookie"):
            raise Refused(400, f"The {name} header is repeated.")
        headers.setdefault(name, v.decode("latin-1"))
    return headers


def check_body_headers(headers: dict[str, str], limit: int) -> None:
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Refused(
            415, f"Content-Encoding {encoding[:50]!r} is not accepted; send plain bodies."
        )
    length = headers.get("content-length")
    if length is None:
        return
    if not length.strip().isdigit():
        raise Refused(400, "Content-Length is not a number.")
    if int(length) > limit:
        raise Refused(
            413,
            f"The request body ({int(length):,} bytes) is over this page's limit of {limit:,} bytes.",
        )


def bounded(receive: Any, limit: int, tripped: list[bool]) -> Any:
    """`receive` that counts body bytes and raises `BodyTooLarge` (413) past `limit`
    (and notes it in `tripped`)."""
    seen = 0

    async def receive_bounded() -> dict:
        nonlocal seen
        if seen > limit:
            raise BodyTooLarge(
                413, f"The request body is over this page's limit of {limit:,} bytes."
            )
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                tripped.append(True)
                raise BodyTooLarge(
                    413, f"The request body is over this page's limit of {limit:,} bytes."
                )
        return message

    return receive_bounded


def closing(send: Any, when: list[bool] | None = None) -> Any:
    """`send` that adds ``Connection: close`` to the response (always, or once `when` is
    non-empty): the server then drops the connection instead of reading and discarding
    the rest of a refused body."""

    async def send_closing(message: dict) -> None:
        if message["type"] == "http.response.start" and (when is None or when):
            message = {
                **message,
                "headers": [*message.get("headers", []), (b"connection", b"close")],
            }
        await send(message)

    return send_closing


PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Run artefacts (report.html) are shown sandboxed: no scripts, no access to the app's origin.
FILE_CSP = (
    "sandbox; default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "font-src data:"
)


class SecurityHeaders:
    """ASGI middleware adding CSP and friends to every response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = FILE_CSP if scope["path"].startswith("/files/") else PAGE_CSP

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in (
                    (b"content-security-policy", csp.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    # Invitation links carry a token: never leak it in a Referer header.
                    (b"referrer-policy", b"no-referrer"),
                ):
                    if k not in names:
                        headers.append((k, v))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install(
    app: Any,
    store: Store,
    settings: SecuritySettings,
    refuse: Callable[[Request, int, str], Response],
) -> None:
    """Add `RequestGuard` inside the app's other middleware (so its refusals carry the
    security headers too)."""
    from starlette.middleware import Middleware

    app.user_middleware.append(
        Middleware(RequestGuard, settings=settings, store=store, refuse=refuse)
    )
