"""The ASGI layers in front of the anchor's routes: who may reach it, how big a body may be,
and what an unexpected failure looks like.

- `OriginPolicy`: the `Host` header must name a trusted host, so a DNS-rebinding page (whose
  requests carry its own host name) cannot reach the anonymous APIs; a request or websocket
  that carries an `Origin` must come from the same origin or an allowed one; `/metrics` and
  the API docs can be kept to loopback clients.
- `ApiKeys`: when the anchor has API keys, every request and websocket but the page's own
  must carry one.
- `BodyLimit`: at most `limit` bytes of any request body are read, whatever it claims.
- `InternalErrors`: an unexpected exception is logged and answered with a JSON 500 that
  carries no exception text, and the keep-alive connection stays usable (an exception that
  escaped to the server would make it drop the connection).

Every refusal is an ApiError (server/errors.py), answered like every other error of the API.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from urllib.parse import urlsplit

from hpi.errors import (ApiError, ApiKeyRequired, BadApiKey, BadRequest, BodyTooLarge, InternalError, NotFound,
                        OriginNotAllowed, UntrustedHost)

log = logging.getLogger(__name__)

DOCS_PATHS = ("/docs", "/redoc", "/openapi.json")
METRICS_PATH = "/metrics"


def _headers(scope) -> dict[bytes, bytes]:
    return dict(scope["headers"])


async def refuse(scope, receive, send, error: ApiError) -> None:
    """An HTTP error, or for a websocket a close before accepting (the client sees HTTP 403)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": error.code})
        return
    await error.response()(scope, receive, send)


def host_name(host: str) -> str:
    """The host of a `Host` header or of an origin's netloc, lower case, without the port."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal keeps its brackets
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def is_loopback(client) -> bool:
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    def __init__(self, app, allowed_hosts: list[str], allowed_origins: list[str], private_metrics: bool,
                 private_docs: bool):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower() for h in allowed_hosts}
        self.any_origin = "*" in allowed_origins
        self.origins = {o.lower().rstrip("/") for o in allowed_origins}
        self.private = ((METRICS_PATH,) if private_metrics else ()) + (DOCS_PATHS if private_docs else ())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.any_host and host_name(host) not in self.hosts:
            return await refuse(scope, receive, send, UntrustedHost(
                "this anchor does not answer for that host name (see HPI_ALLOWED_HOSTS)"))
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_ok(origin.decode("latin-1"), host):
            return await refuse(scope, receive, send, OriginNotAllowed(
                "requests from that origin are not allowed (see HPI_ALLOWED_ORIGINS)"))
        if scope["path"] in self.private and not is_loopback(scope.get("client")):
            return await refuse(scope, receive, send, NotFound("Not Found"))
        return await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        origin = origin.strip().lower().rstrip("/")
        if self.any_origin or origin in self.origins:
            return True
        netloc = urlsplit(origin).netloc
        return bool(netloc) and netloc == host.strip().lower()  # the page's own origin


API_KEY_PROTOCOL = "api-key."
API_KEY_CHALLENGE = {"WWW-Authenticate": 'ApiKey realm="hpi", header="X-API-Key"'}


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class ApiKeys:
    """Every request and websocket must carry one of `keys`, except the exact `open_paths` and
    what lies under `open_prefixes`: the page loads, and learns that it needs a key, before it has one.

    A key comes in `X-API-Key` (`Authorization` carries session and owner tokens). A browser
    cannot set a websocket's headers, so a websocket may instead offer the subprotocol
    `api-key.<key>` beside a real one, which the anchor then accepts: a key in the query string
    would be written to access logs. Keys are compared by their SHA-256 in constant time, so
    neither the time taken nor a key's length tells how close a guess came.
    """

    def __init__(self, app, keys: list[str], open_paths: tuple[str, ...], open_prefixes: tuple[str, ...]):
        self.app = app
        self.digests = [_digest(k.encode()) for k in keys]
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(p.rstrip("/") for p in open_prefixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._open(scope["path"]):
            return await self.app(scope, receive, send)
        key = _headers(scope).get(b"x-api-key")
        protocols = scope.get("subprotocols") or []
        carried = [p for p in protocols if p.startswith(API_KEY_PROTOCOL)]
        if carried:  # the app never sees a key, and the page gets the protocol it offered beside it
            offered = [p for p in protocols if not p.startswith(API_KEY_PROTOCOL)]
            scope = {**scope, "subprotocols": offered}
            send = self._accepting(send, offered)
            key = key or carried[0].removeprefix(API_KEY_PROTOCOL).encode()
        if key is None:
            return await refuse(scope, receive, send, ApiKeyRequired(
                "this anchor needs an API key: send `X-API-Key: <key>` (a websocket may offer "
                f"the subprotocol `{API_KEY_PROTOCOL}<key>` instead)", headers=API_KEY_CHALLENGE))
        if not self._known(key):
            return await refuse(scope, receive, send, BadApiKey(
                "the API key is not one of this anchor's keys (HPI_API_KEYS)", headers=API_KEY_CHALLENGE))
        return await self.app(scope, receive, send)

    def _open(self, path: str) -> bool:
        return path in self.open_paths or any(path == p or path.startswith(p + "/") for p in self.open_prefixes)

    def _known(self, key: bytes) -> bool:
        given = _digest(key)
        return sum(hmac.compare_digest(given, d) for d in self.digests) > 0  # every key compared: no early exit

    @staticmethod
    def _accepting(send, offered: list[str]):
        """A browser fails a handshake that names none of the protocols it offered."""
        async def accept(message):
            if message["type"] == "websocket.accept" and not message.get("subprotocol") and offered:
                message = {**message, "subprotocol": offered[0]}
            await send(message)
        return accept


class BodyLimit:
    """Refuse request bodies over `limit` bytes, whatever Content-Length claims.

    The body is read here (at most `limit` bytes are buffered) and replayed to the app, so a
    chunked or mislabelled upload cannot make an endpoint read more.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _headers(scope).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._reply(scope, receive, send, BadRequest("invalid Content-Length"))
            if int(declared) > self.limit:
                return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        error = BodyTooLarge(f"the request body exceeds the limit of {self.limit} bytes")
        await self._reply(scope, receive, send, error)

    @staticmethod
    async def _reply(scope, receive, send, error: ApiError):
        """The body is left unread: the connection cannot carry another request."""
        error.headers["Connection"] = "close"
        await error.response()(scope, receive, send)


class InternalErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await InternalError("the anchor failed to answer this request; the failure is logged").response()(
                    scope, receive, send)
