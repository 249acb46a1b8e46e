"""Request rates per client: past its rate a client gets 429 with `Retry-After`, the others nothing.

Counted in fixed one-minute windows, per client address (an IPv6 client by its /64, which
one host usually holds whole) and per credential (the bearer token of a request, a sync
channel's session): `rate_per_ip` and `rate_per_token` requests a minute, 0 for no limit.
Health, metrics and the page's static files are not counted. Several anchors behind one
proxy count in their shared Redis, so a client's rate is the fleet's, not each anchor's.

The counts are a guard, not a ledger: if Redis cannot be reached, requests pass (and it is
logged) rather than every client being refused.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import threading
import time

from hpi.metrics import METRICS
from hpi.errors import RateLimited
from hpi.middleware import refuse

log = logging.getLogger(__name__)

WINDOW_S = 60
MAX_LOCAL_KEYS = 200_000  # past this many clients in one window, new ones are not counted until the next
UNCOUNTED = ("/healthz", "/metrics", "/favicon.ico", "/")
UNCOUNTED_PREFIXES = ("/client/", "/shaders/")


def client_key(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "ip:" + host[:64]
    if address.version == 6:
        if address.ipv4_mapped:
            return f"ip:{address.ipv4_mapped}"
        return "ip:" + str(ipaddress.ip_network(f"{address}/64", strict=False))
    return f"ip:{address}"


def token_key(token: str) -> str:
    return "tok:" + hashlib.sha256(token.encode()).hexdigest()[:32]  # tokens are secrets: not kept as such


class LocalCounts:
    """This process's counts of the current window."""

    def __init__(self):
        self._window = -1
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    async def hit(self, key: str, window: int) -> int:
        with self._lock:
            if window != self._window:
                self._window, self._counts = window, {}
            if key not in self._counts and len(self._counts) >= MAX_LOCAL_KEYS:
                return 0
            self._counts[key] = n = self._counts.get(key, 0) + 1
            return n


class RedisCounts:
    """Counts shared by every anchor on one Redis; each window's keys expire with it."""

    def __init__(self, url: str):
        import redis.asyncio
        self._errors = (redis.RedisError, OSError)
        self.redis = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    async def hit(self, key: str, window: int) -> int:
        name = f"hpi:rate:{window}:{key}"
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.expire(name, WINDOW_S * 2)
                return (await pipe.execute())[0]
        except self._errors as e:
            log.warning("rate limits are not counted: redis failed (%s)", type(e).__name__)
            return 0


class RateLimiter:
    def __init__(self, per_ip: int, per_token: int, counts: LocalCounts | RedisCounts):
        self.per_ip, self.per_token, self.counts = per_ip, per_token, counts

    async def check(self, ip: str | None, token: str | None) -> float | None:
        """Count one request of `ip` with `token`; None if it may go on, else seconds until it may."""
        now = time.time()
        window = int(now // WINDOW_S)
        over = False
        if ip is not None and self.per_ip:
            over = await self.counts.hit(client_key(ip), window) > self.per_ip
        if token and self.per_token and not over:
            over = await self.counts.hit(token_key(token), window) > self.per_token
        if not over:
            return None
        METRICS.add("hpi_refused_rate_total")
        return (window + 1) * WINDOW_S - now


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class RateLimit:
    """Refuses requests and websocket handshakes past their client's rate (HTTP 429 / close 1008)."""

    def __init__(self, app, limiter: RateLimiter):
        self.app, self.limiter = app, limiter

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or path in UNCOUNTED or path.startswith(UNCOUNTED_PREFIXES):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        wait = await self.limiter.check(client[0] if client else None, _bearer(dict(scope["headers"])))
        if wait is None:
            return await self.app(scope, receive, send)
        await refuse(scope, receive, send, RateLimited("this client sends requests faster than the anchor allows; "
                                                       "retry after the time Retry-After gives", max(1, round(wait))))
