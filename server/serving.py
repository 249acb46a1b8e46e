"""How the anchor is served by uvicorn: the sync channel's limits enforced on the wire.

The app refuses frames over the protocol's 64 KiB, but uvicorn would first assemble up to
16 MiB per message, so the server is told the limit (`ws_max_size`) and drops a connection
whose frame header announces more. Pings and pongs are answered by the websocket layer
without reaching the app: a client that sends pings and never reads the pongs would grow
the server's write buffer without bound, so control frames are rate-limited and a
connection whose unread backlog passes a bound is dropped.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from hpi.protocol.frames import MAX_FRAME_BYTES

CONTROL_RATE = 20.0  # control frames per second, on average
CONTROL_BURST = 50.0
MAX_BACKLOG = 256 * 1024  # bytes written to a client and not yet taken by it


class GuardedWebSocket(WebSocketsSansIOProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._allowance = CONTROL_BURST
        self._counted_at = self.loop.time()
        self._dropped = False

    def data_received(self, data: bytes) -> None:
        if not self._dropped:
            super().data_received(data)

    def handle_ping(self) -> None:
        if self._control_frame_ok():
            super().handle_ping()

    def handle_pong(self, event) -> None:
        if self._control_frame_ok():
            super().handle_pong(event)

    def _control_frame_ok(self) -> bool:
        if self._dropped:
            return False
        now = self.loop.time()
        self._allowance = min(CONTROL_BURST, self._allowance + (now - self._counted_at) * CONTROL_RATE)
        self._counted_at = now
        if self._allowance < 1 or self.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.logger.warning("dropping websocket %s: control frames too fast or not read", self.client)
            self._dropped = True
            self.transport.abort()
            return False
        self._allowance -= 1
        return True


def server_options() -> dict:
    """Keyword arguments for uvicorn.run / uvicorn.Config that every way of serving the anchor uses."""
    return {"ws": GuardedWebSocket, "ws_max_size": MAX_FRAME_BYTES}
