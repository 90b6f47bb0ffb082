"""A deadline for request headers, which uvicorn lacks: its keep-alive timer stops at the first
byte, so a client that sends a header a byte at a time (slowloris) would hold its connection,
and the socket, for ever. Plugged in through uvicorn's public `Config(http=...)`."""

from __future__ import annotations

import asyncio
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection whose request line and headers are not
    complete `header_timeout` s after the server began waiting for them (the connection opened,
    or the previous response ended). The body has its own limit (serve/guard.py)."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Arm the deadline while the next request's headers are awaited; stop it once they are in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._stop_deadline()
        elif self.header_deadline is None:
            self.header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_deadline(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.logger.warning("%s:%d - closed: request headers not complete within %g s",
                                *(self.client or ("?", 0)), self.header_timeout)
            self.transport.close()


def protocol_with_header_deadline(header_timeout: float):
    """The protocol factory for uvicorn.Config(http=...)."""
    return partial(HeaderDeadlineProtocol, header_timeout=header_timeout)
