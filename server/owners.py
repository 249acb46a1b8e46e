"""Who owns an anonymous resource (a capture collection, a memory): the bearer of its owner token.

Capture collections and memories belong to whoever created them and are invisible to
everyone else. Their owner is named by a bearer token: an owner token the anchor issued at
creation, or, for a collection of a session's states, that session's token. A resource
keeps only the owner's id, a hash of the token, so neither files nor logs reveal tokens.

Owner tokens are signed by the anchor (HMAC-SHA256 with a key kept in the data directory,
mode 0600), so the anchor accepts only tokens it issued: a client cannot pick a guessable
one. Anchors that share the key (the same data directory, or `HPI_OWNER_KEY`) accept each
other's tokens.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from hpi.durable import write_atomic
from hpi.errors import Forbidden, Unauthorized

PREFIX = "hpo_"
_NONCE = 24  # bytes: 192 random bits
_MAC = 16  # bytes of the HMAC kept


def owner_id(token: str) -> str:
    """The id a resource keeps of its owner: 32 hex digits of the token's SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class Owners:
    def __init__(self, key: bytes):
        if len(key) < 32:
            raise ValueError("the owner key needs at least 32 bytes")
        self._key = key

    @classmethod
    def at(cls, path: Path, key_hex: str = "") -> Owners:
        """The key given (hex), else the one kept at `path`, created there on first use."""
        if key_hex:
            return cls(bytes.fromhex(key_hex))
        path = path.expanduser()
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another anchor on the same directory made it first
                pass
            else:
                os.close(fd)
                write_atomic(path, secrets.token_bytes(32))
        return cls(path.read_bytes())

    def _mac(self, nonce: bytes) -> bytes:
        return hmac.new(self._key, b"hpi-owner/1" + nonce, hashlib.sha256).digest()[:_MAC]

    def issue(self) -> str:
        """A new owner token."""
        nonce = secrets.token_bytes(_NONCE)
        return PREFIX + _b64(nonce + self._mac(nonce))

    def check(self, token: str | None) -> str:
        """The owner id of a token this anchor issued: 401 without one, 403 for any other."""
        if not token:
            raise Unauthorized(
                "this resource needs `Authorization: Bearer <owner token>` (returned at its creation)")
        raw = token.removeprefix(PREFIX)
        ok = False
        if raw != token and len(raw) == 54:  # base64 of 40 bytes, unpadded
            try:
                blob = base64.urlsafe_b64decode(raw + "==")
            except ValueError:
                blob = b""
            ok = len(blob) == _NONCE + _MAC and hmac.compare_digest(blob[_NONCE:], self._mac(blob[:_NONCE]))
        if not ok:
            raise Forbidden("the owner token is not one this anchor issued")
        return owner_id(token)
