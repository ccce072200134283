"""uvicorn's httptools HTTP protocol with a deadline and size limits on the request head.

uvicorn reads a request's line and headers without a time or size limit: a client that
dribbles its headers keeps its socket (and whatever it sent) for as long as it likes, and
one that sends megabytes of small headers makes the server hold them all. That is how a
WebSocket handshake reaches the server too, so it is the edge of every WebSocket server on
uvicorn. This subclass of uvicorn's ``httptools`` protocol (it needs ``httptools``, which
``uvicorn[standard]`` installs) adds, for each request head:

- a deadline (`HttpToolsProtocol.head_timeout`, 10 s): from the connection (or the
  first byte of a next request) to the end of the headers; past it the server answers 408
  and closes;
- a limit on the request line (`HttpToolsProtocol.max_request_line`, 8 KiB): 414 and
  close;
- limits on the head (`HttpToolsProtocol.max_head`, 16 KiB, and
  `HttpToolsProtocol.max_headers`, 128 headers): 431 and close.

These are the ``websockets`` server's own limits, so a handshake passes or fails the same on
both. Serve with it as ``uvicorn.run(app, http=HttpToolsProtocol, ...)`` (or
``--http wsbroadcast.transports.uvicorn_http:HttpToolsProtocol``); use
`HttpToolsProtocol.configure` for other limits. Everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornHttpTools

__all__ = ["HttpToolsProtocol"]


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that breaks a limit."""


class HttpToolsProtocol(_UvicornHttpTools):
    """uvicorn's httptools protocol with a deadline and size limits on each request head."""

    head_timeout: ClassVar[float] = 10.0
    """Seconds a client has to send a request's line and headers."""
    max_request_line: ClassVar[int] = 8192
    """Most bytes in a request's target (its URL)."""
    max_head: ClassVar[int] = 16384
    """Most bytes in a request's line and headers together."""
    max_headers: ClassVar[int] = 128
    """Most header fields in a request."""

    _deadline: asyncio.TimerHandle | None = None
    _head_bytes: int | None = None
    """Bytes received of the current request's head, counted per read (httptools buffers a
    header until its end, out of sight); None once its headers are complete."""
    _head_size = 0
    """Bytes of the current request's target and headers, as parsed (a head may come whole
    in one read)."""
    _refusal: HTTPStatus | None = None

    @classmethod
    def configure(
        cls,
        *,
        head_timeout: float | None = None,
        max_request_line: int | None = None,
        max_head: int | None = None,
        max_headers: int | None = None,
    ) -> type[HttpToolsProtocol]:
        """A subclass with other limits (None keeps one), to pass as uvicorn's ``http``."""
        options: dict[str, Any] = {}
        for name, value in (
            ("head_timeout", head_timeout),
            ("max_request_line", max_request_line),
            ("max_head", max_head),
            ("max_headers", max_headers),
        ):
            if value is not None:
                if not value > 0:
                    raise ValueError(f"{name} must be positive, not {value}")
                options[name] = value
        return type(cls.__name__, (cls,), options)

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """uvicorn's, and the deadline for the first request's head starts now."""
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """uvicorn's, without the deadline, and the parser let go (`_let_parser_go`)."""
        self._stop_deadline()
        super().connection_lost(exc)
        self._let_parser_go()

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's: the WebSocket protocol takes the connection over; this one lets its
        parser go (`_let_parser_go`)."""
        super().handle_websocket_upgrade()
        self._stop_deadline()
        self._let_parser_go()

    def _let_parser_go(self) -> None:
        # The parser holds this protocol's bound methods (its callbacks): a reference cycle
        # that would keep every finished connection's protocol, and after a WebSocket
        # upgrade the abandoned HTTP protocol, until the garbage collector's next pass.
        self.parser = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """uvicorn 0.54's ``data_received``, answering a broken limit with its own status."""
        if self._refusal is not None:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(self._refusal)
                return
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_bytes is not None:
            # httptools buffers a header's value before it calls back: count what was fed.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head:
                self._refuse(
                    HTTPStatus.REQUEST_URI_TOO_LONG
                    if not self.headers and len(getattr(self, "url", b"")) > self.max_request_line
                    else HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                )

    def shutdown(self) -> None:
        """uvicorn's, without the deadline."""
        self._stop_deadline()
        super().shutdown()

    # Parser callbacks

    def on_message_begin(self) -> None:
        """A request begins: its head has `head_timeout` to arrive."""
        super().on_message_begin()
        self._start_head()

    def on_url(self, url: bytes) -> None:
        """Collect the target; refuse it with 414 once it is over `max_request_line`."""
        super().on_url(url)
        self._head_size += len(url)
        if len(self.url) > self.max_request_line:
            self._refusal = HTTPStatus.REQUEST_URI_TOO_LONG
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a header; refuse with 431 past `max_headers` or `max_head`."""
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if len(self.headers) > self.max_headers or self._head_size > self.max_head:
            self._refusal = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
            raise _Refused

    def on_headers_complete(self) -> None:
        """The head is complete in time: no more deadline until the next request."""
        self._head_bytes = None
        self._stop_deadline()
        super().on_headers_complete()

    # Helpers

    def _start_head(self) -> None:
        if self._head_bytes is None:
            self._head_bytes = 0
            self._head_size = 0
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self._refuse(HTTPStatus.REQUEST_TIMEOUT)

    def _refuse(self, status: HTTPStatus) -> None:
        """Answer ``status`` with a short plain-text body and close the connection."""
        self._refusal = status
        self._stop_deadline()
        self._head_bytes = None
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        self.logger.info("%s - request head refused: %d %s", client, status, status.phrase)
        body = f"{status.phrase}\n".encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
