"""uvicorn, configured so that no client can hold a connection or the server's memory for long.

What one connection may cost, and where each bound is enforced:

    request headers    at most ``HEADER_BYTES`` (h11 answers 400 and closes), complete within
                       ``Limits.header_timeout_s`` of the connection opening or of the first byte
                       of the request (then the connection is closed: uvicorn itself has no such
                       deadline, so a client sending a header byte now and then held it for ever)
    request body       at most ``Limits.max_body_bytes`` (413), complete within
                       ``Limits.body_timeout_s`` of its headers (408); both in guard.Guard
    idle keep-alive    ``KEEP_ALIVE_S`` between requests (uvicorn's own timer)
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from lorakit.server.protocol import Limits

HEADER_BYTES = 16 * 1024  # h11's default, stated: an Authorization header and a few others fit many times
# Longer than the idle expiry of common clients' connection pools (httpx and the openai client:
# 5 s), so that the client drops an idle connection first: a server that closes first races the
# client's next request on it, which is then lost (seen under load with a shorter idle limit).
KEEP_ALIVE_S = 15


class _HeaderDeadlineProtocol(H11Protocol):
    """h11 over asyncio with a deadline for each request head: the connection is closed when a
    head is not complete ``header_timeout_s`` after the connection opened or after its first byte.
    An idle connection between requests is left to uvicorn's keep-alive timer."""

    header_timeout_s: float = Limits.header_timeout_s

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._between_requests():  # the first byte of a new head
            self._arm_header_deadline()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():  # no complete head came in time
            self.transport.close()


def uvicorn_config(app, limits: Limits, **kwargs) -> uvicorn.Config:
    """uvicorn's Config for ``app`` with the bounds above; ``kwargs`` go to uvicorn (host, port, ...)."""
    protocol = type("HeaderDeadlineProtocol", (_HeaderDeadlineProtocol,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(app, http=protocol, h11_max_incomplete_event_size=HEADER_BYTES,
                          timeout_keep_alive=KEEP_ALIVE_S, **kwargs)
