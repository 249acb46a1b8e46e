"""Session transcripts in Redis: the store several anchors share (server/transcripts.py has the interface).

Behind a proxy that keeps each session on one anchor, any anchor can take a session over
when its own is gone: it finds the transcript here and rebuilds the caches from its token
ids. One hash per session, `hpi:session:<id>` = {rev, data}, expiring `session_ttl_s` after
its last save. A save is a compare-and-set on `rev` (one Lua script, atomic in Redis), so
an anchor holding a stale copy cannot overwrite what another anchor confirmed since.

Durability is Redis's: run it with `appendonly yes` and `appendfsync always` where a
confirmed token must survive a power cut of the Redis host, as the file store's fsync does
(docs/deploy.md).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import redis

from hpi.transcripts import StoreUnavailable, Transcript, TranscriptConflict, parse

KEY = "hpi:session:{}"

# KEYS[1] the session; ARGV: the revision the writer last saw, the new one, the data, the TTL.
_SAVE = """
local held = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if held ~= tonumber(ARGV[1]) then return held end
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'data', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return -1
"""


class RedisTranscripts:
    shared = True

    def __init__(self, url: str, ttl_s: float, timeout_s: float = 2.0):
        self.ttl = max(1, math.ceil(ttl_s))
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._save = self.redis.register_script(_SAVE)

    def save(self, transcript: Transcript) -> None:
        key = KEY.format(transcript.id)
        data = transcript.model_dump_json()
        with _reaching():
            held = self._save(keys=[key], args=[transcript.revision - 1, transcript.revision, data, self.ttl])
        if held != -1:
            raise TranscriptConflict(f"the store holds revision {held} of session {transcript.id}, "
                                     f"not {transcript.revision - 1}")

    def delete(self, session_id: str) -> None:
        with _reaching():
            self.redis.delete(KEY.format(session_id))

    def load(self, session_id: str) -> Transcript | None:
        with _reaching():
            data = self.redis.hget(KEY.format(session_id), "data")
        return None if data is None else parse(data, session_id, f"redis {KEY.format(session_id)}")

    def revision(self, session_id: str) -> int | None:
        with _reaching():
            rev = self.redis.hget(KEY.format(session_id), "rev")
        return None if rev is None else int(rev)

    def load_all(self) -> list[Transcript]:
        """Nothing: sessions are taken up when first asked for (a fleet's sessions are not one anchor's)."""
        return []


@contextmanager
def _reaching():
    """Redis's own errors as StoreUnavailable, which the session store answers like a full disk."""
    try:
        yield
    except redis.RedisError as e:
        raise StoreUnavailable(f"the session store (redis) failed: {type(e).__name__}: {e}") from e
