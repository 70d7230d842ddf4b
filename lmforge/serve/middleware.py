"""What runs in front of every route: the Host check, size, key and rate limits, metrics, logs.

`Guard` is a plain ASGI middleware, not Starlette's `BaseHTTPMiddleware`: it leaves
`receive` alone, so a client's disconnect reaches the route that waits for it, and it
sees the end of a streamed response, so latency covers the whole stream.

Headers are compared as the bytes that arrived. A request may carry any bytes in any
header; none of them may turn into a 500 or skip the metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import re
import time
from typing import TYPE_CHECKING

from starlette.responses import Response

from ..errors import LmforgeError
from .errors import error_response

if TYPE_CHECKING:
    from .state import ServeSettings, ServerState

log = logging.getLogger("lmforge.serve")

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ALL_INTERFACES = frozenset({"", "0.0.0.0", "::"})  # bound to every address: no name of its own
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class RateLimiter:
    """A token bucket per API key: `per_minute` requests, refilled continuously."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        now = time.monotonic()
        tokens, stamp = self.buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - stamp) * self.per_minute / 60.0)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) * 60.0 / self.per_minute
        self.buckets[key] = (tokens - 1.0, now)
        return 0.0


def host_name(value: str) -> str | None:
    """The name in a Host header value (`name`, `name:port`, `[v6]`, `[v6]:port`), lower case,
    IP addresses in their canonical spelling; None if the value is not a well-formed host."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if value.startswith("["):
        return str(address) if address is not None and address.version == 6 else None
    if address is not None:
        return str(address)
    name = name.removesuffix(".")  # "localhost." is the same name, fully qualified
    return name if _HOST_NAME.fullmatch(name) else None


class HostCheck:
    """Refuses requests whose Host header names none of the server's addresses.

    Against DNS rebinding: a web page at attacker.example can have that name resolve to
    127.0.0.1 a moment after it loaded, and the browser then lets the page read this
    server's answers as same-origin. The browser still sends `Host: attacker.example`,
    which is how the server tells. Without API keys the loopback interface is the only
    protection, so the check is on; with keys, the key (which such a page does not have)
    protects the API, and the server answers any name it is reached by (LAN names,
    addresses, proxies) as before.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.enabled = not settings.api_keys and "*" not in settings.allowed_hosts
        self.names = set(LOOPBACK_NAMES)
        for entry in [settings.host, *(h for h in settings.allowed_hosts if h != "*")]:
            entry = entry.strip()
            if entry.count(":") > 1 and not entry.startswith("["):
                entry = f"[{entry}]"  # a bare IPv6 address, as --host takes it
            name = host_name(entry) if entry not in ALL_INTERFACES else ""
            if name is None:
                raise LmforgeError(f"{entry!r} is not a host name or address (for --host / --allow-host)")
            if name not in ALL_INTERFACES:
                self.names.add(name)

    def allows(self, header: bytes | None) -> bool:
        # No Host at all is no browser (browsers always send one), so nothing to rebind.
        if not self.enabled or header is None:
            return True
        return host_name(header.decode("latin-1")) in self.names


class Guard:
    """ASGI middleware: refuses what may not reach a route, and counts and logs every request."""

    def __init__(self, app, state: ServerState, hosts: HostCheck) -> None:
        self.app = app
        self.state = state
        self.hosts = hosts
        self.keys = [k.encode("utf-8") for k in state.settings.api_keys]

    def deny(self, scope) -> Response | None:
        """Host, size, authentication and rate limits, before any route runs."""
        settings = self.state.settings
        headers = dict(scope.get("headers") or ())  # ASGI: lower-case names, raw bytes
        host = headers.get(b"host")
        if not self.hosts.allows(host):
            shown = host.decode("latin-1")[:100]
            return error_response(421, f"this server does not answer to the host name in {shown!r} (a web page "
                                       "reaching it through DNS rebinding would send one); start it with "
                                       "--allow-host NAME to accept that name", code="host_not_allowed")
        try:
            size = int(headers.get(b"content-length") or 0)
        except ValueError:
            size = 0
        if size > settings.max_request_bytes:
            return error_response(413, f"request body exceeds {settings.max_request_bytes} bytes",
                                  code="request_too_large")
        if not scope["path"].startswith(("/v1/", "/api/")):
            return None
        key = "anonymous"
        if self.keys:
            header = headers.get(b"authorization", b"")
            given = header[7:].strip() if header[:7].lower() == b"bearer " else b""
            matches = [hmac.compare_digest(given, k) for k in self.keys]  # every key: time tells nothing
            if not any(matches):
                return error_response(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                      code="invalid_api_key")
            key = settings.api_keys[matches.index(True)]
        wait = self.state.limiter.check(key)
        if wait > 0:
            return error_response(429, "rate limit reached for this API key", "rate_limit_error",
                                   code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            denied = self.deny(scope)
            if denied is not None:
                await denied(scope, receive, send_and_watch)
            else:
                await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            status["code"] = 499  # the client closed the request before an answer (nginx's convention)
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.state.metrics.observe_request(scope["path"], status["code"], elapsed)
            log.info(json.dumps({"method": scope.get("method"), "path": scope["path"], "status": status["code"],
                                 "seconds": round(elapsed, 4)}))
