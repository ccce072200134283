"""The test doubles of wsbroadcast.testing, on their own: what they record, when they block,
when they fail and what they wake."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest
from starlette.types import Message
from starlette.websockets import WebSocket

from wsbroadcast import ControlMessage, Transport
from wsbroadcast.envelope import Draft
from wsbroadcast.testing import (
    MemoryBatchTransport,
    MemoryTransport,
    TransportClosed,
    forget_logged_once,
)
from wsbroadcast.transports.base import BatchTransport, NowaitBatchTransport
from wsbroadcast.transports.starlette import StarletteTransport, starlette_transport

pytestmark = pytest.mark.anyio


def test_the_doubles_satisfy_the_transport_protocols() -> None:
    assert isinstance(MemoryTransport(), Transport)
    assert not isinstance(MemoryTransport(), BatchTransport)
    assert isinstance(MemoryBatchTransport(), NowaitBatchTransport)


async def test_it_records_accept_frames_and_close() -> None:
    transport = MemoryTransport()
    assert not transport.accepted
    await transport.accept()
    await transport.send_text('{"type":"join","seq":1}')
    await transport.send_text('{"type":"error"}')
    assert transport.accepted
    assert transport.texts == ['{"type":"join","seq":1}', '{"type":"error"}']
    assert transport.messages() == [{"type": "join", "seq": 1}, {"type": "error"}]
    assert transport.envelopes() == [{"type": "join", "seq": 1}]
    assert not transport.closed
    await transport.close(4008, "slow")
    await transport.close(1000, "again")  # the first close is the one recorded
    assert (transport.closed, transport.close_code, transport.close_reason) == (True, 4008, "slow")
    with pytest.raises(TransportClosed, match="closed"):
        await transport.send_text("{}")
    assert len(transport.texts) == 2


async def test_send_text_refuses_what_is_not_text() -> None:
    with pytest.raises(TypeError, match="bytes"):
        await MemoryTransport().send_text(b"{}")  # type: ignore[arg-type]  # the point


async def test_fail_after_plays_a_client_that_vanished() -> None:
    transport = MemoryTransport(fail_after=1)
    await transport.send_text("{}")
    with pytest.raises(TransportClosed, match="gone"):
        await transport.send_text("{}")
    assert transport.texts == ["{}"]
    assert not transport.closed


async def test_a_paused_transport_blocks_sends_until_resumed() -> None:
    transport = MemoryTransport()
    transport.pause()
    transport.pause()  # pausing twice needs one resume
    async with anyio.create_task_group() as tg:
        tg.start_soon(transport.send_text, "{}")
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert transport.texts == []
        transport.resume()
        await transport.wait_for_messages(1)
    transport.resume()  # not paused: a no-op
    assert transport.texts == ["{}"]


async def test_turns_per_send_yields_to_other_tasks_before_recording() -> None:
    transport = MemoryTransport(turns_per_send=3)
    order: list[str] = []

    async def send() -> None:
        await transport.send_text("{}")
        order.append("sent")

    async def other() -> None:
        await anyio.lowlevel.checkpoint()
        order.append("other")

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        tg.start_soon(other)
    assert order == ["other", "sent"]


async def test_wait_until_wakes_on_frames_and_on_close() -> None:
    transport = MemoryTransport()
    async with anyio.create_task_group() as tg:

        async def waiter() -> None:
            await transport.wait_until(lambda t: len(t.texts) == 2)
            await transport.wait_closed()

        tg.start_soon(waiter)
        await transport.send_text("{}")
        await transport.send_text("{}")
        await transport.close()
    await transport.wait_until(lambda t: t.closed)  # already true: returns at once


async def test_batch_double_writes_at_once_unless_paused_or_slow() -> None:
    envelope = Draft("message", "lobby", "alice", {"n": 1}).envelope(1, "e")
    error = ControlMessage("error", None)
    transport = MemoryBatchTransport()
    assert transport.send_batch_nowait([envelope, error])
    assert transport.texts == [envelope.text, error.text]
    transport.pause()
    assert not transport.send_batch_nowait([error])
    transport.resume()
    assert not MemoryBatchTransport(turns_per_send=1).send_batch_nowait([error])
    await transport.send_batch([envelope, error])
    assert transport.texts[2:] == [envelope.text, error.text]


async def test_batch_double_fails_like_the_plain_one() -> None:
    message = ControlMessage("welcome", None)
    vanished = MemoryBatchTransport(fail_after=1)
    with pytest.raises(TransportClosed, match="gone"):
        vanished.send_batch_nowait([message, message])
    assert vanished.texts == [message.text]
    closed = MemoryBatchTransport()
    await closed.close()
    with pytest.raises(TransportClosed, match="closed"):
        closed.send_batch_nowait([message])
    assert closed.texts == []


def _websocket() -> WebSocket:
    """A Starlette WebSocket that is never used for I/O (its scope offers no extension)."""

    async def receive() -> Message:
        raise AssertionError("not reached")

    async def send(message: Message) -> None:
        raise AssertionError("not reached")

    return WebSocket({"type": "websocket"}, receive, send)


def test_forget_logged_once_lets_a_note_be_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    """starlette_transport says once per process that it has no fast path; after
    forget_logged_once it says it again, as a fresh process would."""
    caplog.set_level(logging.INFO, logger="wsbroadcast.transports.starlette")
    forget_logged_once()
    for _ in range(2):
        assert type(starlette_transport(_websocket())) is StarletteTransport
    assert len(caplog.records) == 1
    forget_logged_once()
    starlette_transport(_websocket())
    assert len(caplog.records) == 2
    assert caplog.records[0].getMessage() == caplog.records[1].getMessage()
