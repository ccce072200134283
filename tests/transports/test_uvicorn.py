"""wsbroadcast's uvicorn WebSocket protocol (wsbroadcast.transports.uvicorn) on a real uvicorn."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
import weakref
from typing import Any, ClassVar, cast

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

from tests.support import cyclic_garbage, kinds_from
from tests.transports.support import (
    FinishedProtocol,
    RecordingProtocol,
    assert_join_then_300_broadcasts,
    port_of,
    raw_exchange,
    shed_a_stalled_client_on_uvicorn,
    upgrade_request,
    uvicorn_server,
)
from wsbroadcast import ConnectionManager
from wsbroadcast.testing import forget_logged_once
from wsbroadcast.transports.starlette import (
    StarletteFramesTransport,
    StarletteTransport,
    starlette_transport,
)
from wsbroadcast.transports.uvicorn import (
    WebSocketProtocol,
    _PingWheel,
    _restart_parser,
    _Writable,
)
from wsbroadcast.transports.uvicorn_http import HttpToolsProtocol


async def _uvicorn_round(
    protocol: type[WebSocketProtocol], *, deflate: bool
) -> tuple[list[Any], list[type[StarletteTransport]]]:
    """Broadcast 300 frames to one client of uvicorn; return what it got and the transport."""
    transports: list[type[StarletteTransport]] = []
    received: list[Any] = []
    async with ConnectionManager(queue_size=4096) as manager:

        async def endpoint(websocket: WebSocket) -> None:
            transport = starlette_transport(websocket)
            transports.append(type(transport))
            connection = await manager.connect(transport, "reader")
            with connection.cancel_on_close():
                await websocket.receive()  # the client's close
            await manager.disconnect(connection)

        async with (
            uvicorn_server(endpoint, protocol, deflate=deflate) as url,
            connect(url, compression="deflate") as client,
        ):
            received.append(json.loads(await client.recv()))
            for n in range(300):
                await manager.broadcast("lobby", {"n": n, "pad": "é" * (n * 7)}, "writer")
            for _ in range(300):
                received.append(json.loads(await client.recv()))
            await client.send(json.dumps(received[-1]))  # writing after raw frames is fine
    return received, transports


class _WithoutWritable(WebSocketProtocol):
    """A protocol as if a uvicorn release had renamed an attribute the extension needs."""

    _compatible = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.writable

    async def send(self, message: Any) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        await super().send(message)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("protocol", "deflate", "fast"),
    [
        (WebSocketProtocol, False, True),
        (WebSocketProtocol, True, False),  # the client asks for deflate and gets it
        (_WithoutWritable, False, False),
    ],
    ids=["frames", "deflate-negotiated", "incompatible-uvicorn"],
)
async def test_uvicorn_protocol_offers_raw_frames_only_where_they_are_right(
    protocol: type[WebSocketProtocol], deflate: bool, fast: bool
) -> None:
    received, transports = await _uvicorn_round(protocol, deflate=deflate)
    assert transports == [StarletteFramesTransport if fast else StarletteTransport]
    assert_join_then_300_broadcasts(received)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_client_that_stops_reading_is_shed_and_dropped_on_uvicorn() -> None:
    [transport] = await shed_a_stalled_client_on_uvicorn(
        lambda websocket: starlette_transport(websocket, close_timeout=0.5)
    )
    assert isinstance(transport, StarletteFramesTransport)
    assert transport.close_timed_out
    assert transport.aborted


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_no_fast_path_is_said_once_not_per_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three connections that negotiate permessage-deflate on uvicorn: one line from the
    protocol (why) and one from starlette_transport (what it does instead), not three each."""
    forget_logged_once()
    caplog.set_level(logging.INFO, logger="wsbroadcast.transports")
    for _ in range(3):
        _, transports = await _uvicorn_round(WebSocketProtocol, deflate=True)
        assert transports == [StarletteTransport]
    for name in ("wsbroadcast.transports.uvicorn", "wsbroadcast.transports.starlette"):
        lines = [r.getMessage() for r in caplog.records if r.name == name]
        assert len(lines) == 1, (name, lines)
    assert "permessage-deflate" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (upgrade_request("/?pad=" + "p" * 9000), b"414"),
        (upgrade_request("/", "".join(f"X-{n}: {n}\r\n" for n in range(200))), b"431"),
    ],
    ids=["request-line", "headers"],
)
async def test_uvicorn_protocol_sends_the_refusal_of_a_handshake_it_cannot_parse(
    request_bytes: bytes, status: bytes
) -> None:
    """``websockets`` refuses the request (414, 431) while parsing it; uvicorn's protocol
    never wrote that response and left the socket open. Here on uvicorn's own HTTP
    protocol, which has no limits of its own, so the request reaches the WebSocket one."""

    async def endpoint(websocket: WebSocket) -> None:
        raise AssertionError("not reached")

    async with uvicorn_server(endpoint, WebSocketProtocol, deflate=False) as url:
        response = await anyio.to_thread.run_sync(raw_exchange, url, request_bytes)
    assert response.startswith(b"HTTP/1.1 " + status + b" "), response[:200]


def test_configure_makes_a_subclass_with_other_limits() -> None:
    quiet = WebSocketProtocol.configure(max_write_buffer=1024, close_wait=0.5, offer_frames=False)
    assert issubclass(quiet, WebSocketProtocol)
    assert (quiet.max_write_buffer, quiet.close_wait, quiet.offer_frames) == (1024, 0.5, False)
    same = WebSocketProtocol.configure()  # None keeps every limit
    assert (same.max_write_buffer, same.close_wait, same.offer_frames) == (
        WebSocketProtocol.max_write_buffer,
        WebSocketProtocol.close_wait,
        True,
    )
    with pytest.raises(ValueError, match="max_write_buffer must be positive"):
        WebSocketProtocol.configure(max_write_buffer=0)
    with pytest.raises(ValueError, match="close_wait must be positive"):
        WebSocketProtocol.configure(close_wait=0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_protocol_that_does_not_offer_frames_serves_plain_asgi() -> None:
    received, transports = await _uvicorn_round(
        WebSocketProtocol.configure(offer_frames=False), deflate=False
    )
    assert transports == [StarletteTransport]
    assert_join_then_300_broadcasts(received)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_receive_cancelled_while_it_waits_loses_nothing_and_order_holds() -> None:
    # The protocol's own receive queue: a receive cancelled while it waits loses nothing,
    # and a burst of frames reaches the application whole and in order.
    got: list[str] = []

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await websocket.receive()
        assert scope.cancelled_caught
        waiting = anyio.CancelScope()
        async with anyio.create_task_group() as tg:

            async def wait_then_give_up() -> None:
                with waiting:
                    await websocket.receive()

            tg.start_soon(wait_then_give_up)
            await anyio.wait_all_tasks_blocked()
            waiting.cancel()
        assert waiting.cancelled_caught
        await websocket.send_text("ready")
        while len(got) < 500:
            got.append(await websocket.receive_text())
        await websocket.send_text("done")

    with anyio.fail_after(30):
        async with (
            uvicorn_server(endpoint, WebSocketProtocol, deflate=False) as url,
            connect(url) as client,
        ):
            assert await client.recv() == "ready"
            for n in range(500):
                await client.send(str(n))
            assert await client.recv() == "done"
    assert got == [str(n) for n in range(500)]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("closes", ["client", "server"])
async def test_a_closed_connection_is_freed_by_reference_counting_on_uvicorn(
    closes: str,
) -> None:
    # The extension's methods in the scope made a cycle with the protocol: every closed
    # connection waited for a full collection (see docs/performance.md).
    async with ConnectionManager() as manager:

        async def endpoint(websocket: WebSocket) -> None:
            connection = await manager.connect(starlette_transport(websocket), "reader")
            with connection.cancel_on_close():
                await websocket.receive()  # "close me", or the client's close
            await manager.disconnect(connection)

        # As the chat app serves: with wsbroadcast's HTTP protocol too (uvicorn's keeps a
        # cycle with its parser). The event loop here is asyncio's own, whose socket
        # transports keep a cycle of their own (uvloop's do not): not checked.
        http = HttpToolsProtocol
        async with uvicorn_server(endpoint, FinishedProtocol, deflate=False, http=http) as url:
            for _ in range(2):  # the first connection makes what uvicorn makes once
                FinishedProtocol.done = anyio.Event()
                with cyclic_garbage() as garbage, anyio.fail_after(30):
                    async with connect(url) as client:
                        assert json.loads(await client.recv())["type"] == "join"
                        await manager.broadcast("lobby", "to the reader", "writer")
                        assert json.loads(await client.recv())["data"] == "to the reader"
                        if closes == "server":
                            await client.send("close me")
                            await client.wait_closed()
                    await FinishedProtocol.done.wait()
    assert kinds_from(garbage, "wsbroadcast", "uvicorn", "starlette") == []


# -- what an idle connection keeps


def _opened(request: bytes, *, max_size: int | None = 2**20) -> tuple[ServerProtocol, list[Any]]:
    """A sans-I/O server connection that received ``request`` and accepted it, and the
    events that came after the request."""
    conn = ServerProtocol(max_size=max_size)
    conn.receive_data(request)
    handshake, *after = conn.events_received()
    assert isinstance(handshake, Request)
    conn.send_response(conn.accept(handshake))
    conn.data_to_send()
    return conn, after


def _frame(opcode: Opcode, data: bytes, *, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def _outcome(conn: ServerProtocol) -> tuple[object, ...]:
    exc = conn.parser_exc
    return (
        conn.events_received(),
        conn.data_to_send(),
        conn.state,
        conn.close_code,
        None if exc is None else (type(exc), str(exc)),
    )


_client_frames = st.one_of(
    st.builds(lambda t: _frame(Opcode.TEXT, t.encode()), st.text(max_size=200)),
    st.builds(lambda b: _frame(Opcode.BINARY, b), st.binary(max_size=300)),
    st.builds(lambda b: _frame(Opcode.TEXT, b, fin=False), st.binary(max_size=20)),
    st.builds(
        lambda b, fin: _frame(Opcode.CONT, b, fin=fin), st.binary(max_size=20), st.booleans()
    ),
    st.builds(lambda b: _frame(Opcode.PING, b), st.binary(max_size=125)),
    st.builds(lambda b: _frame(Opcode.PONG, b), st.binary(max_size=125)),
    st.just(_frame(Opcode.TEXT, b"\xff\xfe")),  # not UTF-8: websockets leaves that to uvicorn
    st.just(_frame(Opcode.TEXT, b"x" * 1500)),  # over max_size
    st.just(Frame(Opcode.TEXT, b"unmasked").serialize(mask=False)),
    st.just(b"\x83\x80\x00\x00\x00\x00"),  # a reserved opcode
    st.just(_frame(Opcode.CLOSE, b"\x03\xe8bye")),
    st.binary(min_size=1, max_size=12),  # noise
)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(_client_frames, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
)
def test_a_restarted_parser_reads_what_the_original_would(
    frames: list[bytes], cuts: list[int]
) -> None:
    # Any input, cut anywhere, gives the same events, replies, state and error on a
    # connection whose parser was restarted after the handshake as on one whose was not.
    request = upgrade_request("/")
    (restarted, _), (original, _) = _opened(request, max_size=1000), _opened(request, max_size=1000)
    assert _restart_parser(restarted)
    data = b"".join(frames)
    bounds = [0, *sorted(cut for cut in cuts if cut < len(data)), len(data)]
    for start, end in itertools.pairwise(bounds):
        for conn in (restarted, original):
            if conn.state is not State.CLOSED:
                conn.receive_data(data[start:end])
        assert _outcome(restarted) == _outcome(original)


def test_the_parser_is_not_restarted_in_the_middle_of_a_frame() -> None:
    # A client that sends a frame before the handshake's answer: the parser that read the
    # request may be inside that frame when the application accepts.
    frame = _frame(Opcode.TEXT, b"early")
    for sent in range(1, len(frame)):
        conn, after = _opened(upgrade_request("/") + frame[:sent])
        assert not _restart_parser(conn)
        assert after == []
        conn.receive_data(frame[sent:])
        assert conn.events_received() == [Frame(Opcode.TEXT, b"early")]
    # A whole frame first leaves it between frames, where it is restarted.
    conn, after = _opened(upgrade_request("/") + frame)
    assert after == [Frame(Opcode.TEXT, b"early")]
    assert _restart_parser(conn)
    conn.receive_data(frame)
    assert conn.events_received() == [Frame(Opcode.TEXT, b"early")]


def test_the_parser_of_a_refused_or_closed_connection_is_left_alone() -> None:
    conn = ServerProtocol()
    conn.receive_data(upgrade_request("/"))
    handshake = conn.events_received()[0]
    assert isinstance(handshake, Request)
    conn.send_response(conn.reject(403, "no"))
    assert not _restart_parser(conn)
    conn, _ = _opened(upgrade_request("/"))
    conn.receive_data(_frame(Opcode.CLOSE, b"\x03\xe8"))
    assert not _restart_parser(conn)


class _RequestWatcher(WebSocketProtocol):
    """Records a weak reference to each handshake request it reads, and to itself."""

    requests: ClassVar[list[weakref.ref[Request]]] = []
    protocols: ClassVar[list[weakref.ref[WebSocketProtocol]]] = []

    def handle_connect(self, event: Request) -> None:
        self.requests.append(weakref.ref(event))
        self.protocols.append(weakref.ref(self))
        super().handle_connect(event)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_open_connection_keeps_neither_its_request_nor_a_dict_of_its_own() -> None:
    # websockets' parser kept it, with its headers, for the connection's lifetime.
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        while True:
            await websocket.send_text(await websocket.receive_text())

    _RequestWatcher.requests.clear()
    async with (
        uvicorn_server(endpoint, _RequestWatcher, deflate=False) as url,
        connect(url, compression=None) as client,
    ):
        for n in range(3):  # read by the restarted parser
            await client.send(f"message {n}" * n)
            assert await client.recv() == f"message {n}" * n
        assert len(_RequestWatcher.requests) == 1
        assert _RequestWatcher.requests[0]() is None
        # CPython shares the keys of a class's instance dicts up to 30 of them; past that
        # (uvicorn's protocol sets 37 attributes) each connection had a whole table.
        protocol = _RequestWatcher.protocols[0]()
        assert protocol is not None
        assert len(vars(protocol)) < 30
        assert sys.getsizeof(vars(protocol)) < 800  # 1,584 bytes unshared, 296 shared


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_writable_wakes_every_waiter_and_forgets_cancelled_ones() -> None:
    writable = _Writable(asyncio.get_running_loop())
    assert writable.is_set()
    assert await writable.wait()
    writable.clear()
    assert not writable.is_set()
    woken: list[int] = []

    async def wait(n: int) -> None:
        assert await writable.wait()
        woken.append(n)

    async with anyio.create_task_group() as group:
        group.start_soon(wait, 1)
        group.start_soon(wait, 2)
        with anyio.CancelScope() as gave_up:
            gave_up.cancel()
            await writable.wait()
        await anyio.lowlevel.checkpoint()
        assert woken == []
        assert writable._waiters is not None
        assert len(writable._waiters) == 2  # the cancelled one took itself out
        writable.set()
    assert sorted(woken) == [1, 2]
    assert writable._waiters is None


# -- keepalive pings, one timer per loop


async def _read_frame(stream: anyio.abc.ByteStream, buffer: bytearray) -> tuple[int, bytes]:
    """The next frame the server sent (unmasked): its opcode and payload."""

    async def at_least(n: int) -> None:
        while len(buffer) < n:
            buffer.extend(await stream.receive())

    await at_least(2)
    length, start = buffer[1] & 0x7F, 2
    if length == 126:
        await at_least(4)
        length, start = int.from_bytes(buffer[2:4], "big"), 4
    await at_least(start + length)
    opcode, payload = buffer[0] & 0x0F, bytes(buffer[start : start + length])
    del buffer[: start + length]
    return opcode, payload


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_keepalive_pings_keep_an_answering_client_and_close_a_silent_one() -> None:
    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    RecordingProtocol.lost = anyio.Event()
    async with uvicorn_server(
        endpoint, RecordingProtocol, deflate=False, ws_ping_interval=0.1, ws_ping_timeout=0.5
    ) as url:
        with anyio.fail_after(30):
            async with await anyio.connect_tcp("127.0.0.1", port_of(url)) as stream:
                await stream.send(upgrade_request("/"))
                buffer = bytearray()
                while b"\r\n\r\n" not in buffer:
                    buffer.extend(await stream.receive())
                assert buffer.startswith(b"HTTP/1.1 101")
                del buffer[: buffer.index(b"\r\n\r\n") + 4]
                payloads = set()
                for _ in range(3):  # answered: each pong leads to the next ping
                    opcode, payload = await _read_frame(stream, buffer)
                    assert opcode == Opcode.PING.value
                    payloads.add(payload)
                    await stream.send(_frame(Opcode.PONG, payload))
                assert len(payloads) == 3
                assert (await _read_frame(stream, buffer))[0] == Opcode.PING.value
                opcode, payload = await _read_frame(stream, buffer)  # not answered
                assert opcode == Opcode.CLOSE.value
                assert int.from_bytes(payload[:2], "big") == 1011
            await RecordingProtocol.lost.wait()
            # The last connection gone, its loop's wheel is gone too.
            assert asyncio.get_running_loop() not in _PingWheel._wheels
            # So it is when a connection closes with its next ping in the wheel.
            RecordingProtocol.lost = anyio.Event()
            async with connect(url, compression=None, ping_interval=None) as client:
                assert asyncio.get_running_loop() in _PingWheel._wheels
                await client.send("bye")
            await RecordingProtocol.lost.wait()
            assert asyncio.get_running_loop() not in _PingWheel._wheels


class _Pinged:
    """Stands for a connection in the wheel: records its pings."""

    def __init__(self, name: str, log: list[str], done: asyncio.Event, fail: bool = False) -> None:
        self.name, self.log, self.done, self.fail = name, log, done, fail
        self._ping_tick: int | None = None

    def send_keepalive_ping(self) -> None:
        self.log.append(self.name)
        self.done.set()
        if self.fail:
            raise RuntimeError("the socket is gone")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_wheel_pings_in_order_skips_removed_ones_and_isolates_failures() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        wheel = _PingWheel.of(loop)
        assert _PingWheel.of(loop) is wheel
        log: list[str] = []
        last = asyncio.Event()
        first, removed, failing = (
            _Pinged("first", log, asyncio.Event()),
            _Pinged("removed", log, asyncio.Event()),
            _Pinged("failing", log, asyncio.Event(), fail=True),
        )
        later = _Pinged("later", log, last)
        ticks = {}
        for pinged, delay in ((later, 0.35), (removed, 0.0), (first, 0.0), (failing, 0.0)):
            pinged._ping_tick = ticks[pinged.name] = wheel.add(cast(Any, pinged), delay)
        assert ticks["later"] > ticks["first"] == ticks["removed"]
        wheel.remove(cast(Any, removed), ticks["removed"])
        wheel.remove(cast(Any, removed), ticks["removed"])  # twice: nothing more
        await last.wait()
        assert sorted(log[:2]) == ["failing", "first"]
        assert log[2:] == ["later"]
        assert first._ping_tick is None
        assert [type(error["exception"]) for error in errors] == [RuntimeError]
        assert loop not in _PingWheel._wheels  # nothing left to ping
        wheel = _PingWheel.of(loop)
        wheel.remove(cast(Any, first), wheel.add(cast(Any, first), 0.0))
        assert loop not in _PingWheel._wheels  # the last one removed: the timer cancelled
        assert wheel._timer is None
    finally:
        loop.set_exception_handler(None)
