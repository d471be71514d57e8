"""What the server does below the app, per connection: a deadline on each request head, a cap on the
connections still sending one, and the uvicorn settings `pneumoscan serve` runs with.

uvicorn's h11 protocol has no timeout for a request's head (its keep-alive timer stops at the first byte
and is not started again), so a client sending its headers a byte a second, or connecting and sending
nothing, would hold a connection for as long as it liked. `HeadDeadlineProtocol` closes such a
connection `head_timeout_s` after it was opened or got its last answer (with 408 when it had sent part
of a head), and when more than `max_pending` connections are waiting for their head at once it closes
those that have waited longest, so such clients never hold every place under `--max-connections` for
long. A connection is never closed that way in its first `grace_s` (a second, or half the head timeout):
a burst of new connections is accepted before any of their heads is read.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                   b"connection: close\r\ncontent-length: 41\r\n\r\nthe request head did not arrive in time\r\n")


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on connections waiting for one.
    Use `head_deadline_protocol(...)`, which gives each server its own settings and its own waiting list."""

    head_timeout_s: ClassVar[float] = HEAD_TIMEOUT_S
    max_pending: ClassVar[int] = 32
    grace_s: ClassVar[float] = 1.0
    # the connections waiting for a head, longest-waiting first, and since when (the loop's clock)
    pending: ClassVar[dict[HeadDeadlineProtocol, float]] = {}

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._wait_for_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived (or the connection failed)
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._wait_for_head()  # the next request's head, unless a pipelined one was already read

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def _wait_for_head(self) -> None:
        self._stop_waiting()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_late)
        self.pending[self] = self.loop.time()
        while len(self.pending) > self.max_pending:
            oldest, since = next(iter(self.pending.items()))
            if self.loop.time() - since < self.grace_s:
                break
            oldest._head_too_late()

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.pending.pop(self, None)

    def _head_too_late(self) -> None:
        """Close the connection: 408 if part of a head came, silently if nothing did (an idle keep-alive)."""
        self._stop_waiting()
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:
            self.transport.write(REQUEST_TIMEOUT)
        self.timeout_keep_alive_handler()  # uvicorn's own way to close an idle connection


def head_deadline_protocol(head_timeout_s: float = HEAD_TIMEOUT_S, max_pending: int = 32) -> type[HeadDeadlineProtocol]:
    """A `HeadDeadlineProtocol` class for one server: its deadline, its cap and its own waiting list."""
    if head_timeout_s <= 0 or max_pending < 1:
        raise ValueError(f"head timeout must be > 0 s and the cap on connections waiting for a head >= 1 "
                         f"(got {head_timeout_s} s and {max_pending})")
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {
        "head_timeout_s": head_timeout_s, "max_pending": max_pending, "grace_s": min(1.0, head_timeout_s / 2),
        "pending": {}})


def server_config(app: Any, host: str = "127.0.0.1", port: int = 8000, max_connections: int = 64,
                  head_timeout_s: float = HEAD_TIMEOUT_S, log_level: str = "info") -> Any:
    """The uvicorn configuration of `pneumoscan serve`: 503 beyond `max_connections`, idle keep-alive
    connections closed after 5 s, each request head due within `head_timeout_s`, and at most half of
    `max_connections` connections waiting for a head at once."""
    import uvicorn

    protocol = head_deadline_protocol(head_timeout_s, max(1, max_connections // 2))
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                          timeout_keep_alive=KEEP_ALIVE_S, http=protocol)
