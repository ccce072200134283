"""A connection's outbound queue, sans I/O: what to send next, bounded, with its policy.

This module does no I/O and imports no event loop library: it decides, the way the
``websockets`` library's ``Protocol`` does for bytes. `OutboundQueue` holds the
messages waiting for one client — shared `Envelope` objects of the rooms
it is in and its own `ControlMessage` objects — bounded in messages
*and* bytes, in one order of arrival, without duplicates (each room's seqs are tracked on
their own). The I/O layer (`Connection` and the manager's writer and
flusher) takes batches from it and reports what it wrote; the queue never waits and never blocks a
broadcast. Every state change is a plain method call, so it is unit-tested without a loop.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import JsonValue

from .control import CloseCode, ControlMessage
from .envelope import Envelope

__all__ = [
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "ConnectionState",
    "OutboundMessage",
    "OutboundQueue",
    "QueueStatistics",
    "SlowConsumerPolicy",
    "frames_of",
]

DEFAULT_QUEUE_SIZE = 1024
"""Frames a connection may have waiting, by default."""
DEFAULT_QUEUE_BYTES = 1024 * 1024
"""Bytes a connection may have waiting, by default (Centrifugo's slow-client limit)."""

OutboundMessage = Envelope | ControlMessage
"""What a connection's queue holds and a transport sends: a room's envelope (shared by every
recipient) or a control message for this connection only. Both have `text`, `size` and
`frame`."""


def frames_of(messages: Sequence[OutboundMessage]) -> bytes:
    """The frames of `messages` back to back, for one socket write.

    Each message contributes its prepared `frame`: an envelope's is shared by every recipient.
    """
    if len(messages) == 1:  # the common case: one publish since the last write
        return messages[0].frame
    return b"".join([message.frame for message in messages])


class SlowConsumerPolicy(str, enum.Enum):
    """What happens when a connection's outbound queue is full and another frame arrives.

    The queue is full when it holds ``queue_size`` frames or ``queue_bytes`` bytes.
    ``DISCONNECT`` (the default) closes the connection with close code ``4008``
    (`SLOW_CONSUMER`): the client knows it fell behind and can
    reconnect with ``since`` and ``epoch`` to recover what it missed from history.
    ``DROP_OLDEST`` keeps the connection and discards the oldest queued envelopes until the
    new frame fits (control messages such as errors and ``history_lost`` are kept while there
    is an envelope to drop, since history cannot give them back): the client sees a gap in
    ``seq`` and can resume from its last seq. Neither policy ever makes a broadcast wait.
    """

    DISCONNECT = "disconnect"
    DROP_OLDEST = "drop_oldest"


class ConnectionState(enum.Enum):
    """Where a connection is in its life. It only ever moves forward."""

    RECOVERING = "recovering"
    """Accepted; joining its room and replaying history. Live frames wait, bounded."""
    OPEN = "open"
    """Receiving the live stream."""
    CLOSING = "closing"
    """No longer receiving; the socket is being closed and presence updated."""
    CLOSED = "closed"
    """Gone: removed from its room, socket closed, ``leave`` announced if it was the last."""


@dataclass(frozen=True)
class QueueStatistics:
    """A snapshot of one queue, like anyio's ``MemoryObjectStreamStatistics``."""

    state: ConnectionState
    queued: int
    """Frames waiting now (including those being written)."""
    queued_bytes: int
    """Bytes waiting now (including those being written)."""
    queue_size: int
    queue_bytes: int
    delivered: int
    """Frames written to the transport."""
    dropped: int
    """Frames that were queued but never written (drop_oldest, or still queued at close)."""


class _Reset:
    """A stream reset held while recovering: ``history_lost``, then seqs restart."""

    __slots__ = ("after_seq", "epoch", "room")

    def __init__(self, room: str, epoch: str, after_seq: int) -> None:
        self.room = room
        self.epoch = epoch
        self.after_seq = after_seq


class OutboundQueue:
    """The frames waiting for one client, bounded in count and bytes, in send order.

    The queue follows the rooms it was told of: ``room`` (the connection's first) and those
    `add_room` added until `remove_room`. Envelopes of those rooms are queued once
    each (a seq not above the last one queued for its room is a duplicate and is skipped),
    those of other rooms never; control messages always. While `state` is ``RECOVERING``
    every frame is held aside, under the same bounds, until `go_live` says which seq
    the live stream follows; while a room added later recovers, its envelopes are held the
    same way until `room_live`. When a frame does not fit, the
    `SlowConsumerPolicy` decides: drop the oldest, or `abort` with 4008.

    :param on_ready: called (synchronously) when frames become available to an idle writer:
        the I/O layer schedules a write. Not called again until `take` empties it.
    :param on_abort: called once, synchronously, when the queue aborts (by its policy or by
        `abort`): the I/O layer starts closing the connection.
    """

    __slots__ = (
        "_bytes",
        "_delivered",
        "_dropped",
        "_first",
        "_first_seq",
        "_held",
        "_held_bytes",
        "_held_count",
        "_items",
        "_last",
        "_on_abort",
        "_on_ready",
        "_ready",
        "_recovering",
        "_unsent",
        "_unsent_bytes",
        "close_code",
        "close_reason",
        "overflowed",
        "policy",
        "queue_bytes",
        "queue_size",
        "room",
        "state",
    )

    def __init__(
        self,
        room: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT,
        on_ready: Callable[[], None] | None = None,
        on_abort: Callable[[], None] | None = None,
    ) -> None:
        self.room = room
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.policy = policy
        self.state = ConnectionState.RECOVERING
        # The first room's last seq lives in slots (every broadcast to it reads and writes
        # it), the other rooms' in a dict.
        self._first = True
        """Whether the queue follows its first room (until removed; a re-join uses _last)."""
        self._first_seq = 0
        self._last: dict[str, int] = {}
        """The seq of the newest envelope queued per other room the queue follows."""
        self._recovering: tuple[str, ...] = ()
        """Rooms added while open whose envelopes are held until `room_live`: a few at a
        time, none for almost every connection, so a tuple replaced on change (the empty
        tuple is shared; an empty set, or an emptied frozenset, is 216 bytes)."""
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.overflowed = False
        """True once the queue overflowed under the ``disconnect`` policy."""
        self._items: list[OutboundMessage] = []
        self._bytes = 0
        self._held: list[OutboundMessage | _Reset] = []
        self._held_count = 0
        self._held_bytes = 0
        self._unsent = 0
        self._unsent_bytes = 0
        self._ready = False
        self._delivered = 0
        self._dropped = 0
        self._on_ready = on_ready
        self._on_abort = on_abort

    def statistics(self) -> QueueStatistics:
        """The queue's length and size now, and its counters."""
        held, held_bytes = self._held_count, self._held_bytes
        return QueueStatistics(
            self.state,
            len(self._items) + held + self._unsent,
            self._bytes + held_bytes + self._unsent_bytes,
            self.queue_size,
            self.queue_bytes,
            self._delivered,
            self._dropped,
        )

    @property
    def last_seq(self) -> int:
        """The seq of the newest envelope of the first room queued (0 before the first)."""
        return self.last_seq_of(self.room) or 0

    def last_seq_of(self, room: str) -> int | None:
        """The seq of the newest envelope of ``room`` queued; None if not following it."""
        if self._first and room == self.room:
            return self._first_seq
        return self._last.get(room)

    def _set_seq(self, room: str, seq: int) -> None:
        if self._first and room == self.room:
            self._first_seq = seq
        else:
            self._last[room] = seq

    def follows(self, room: str) -> bool:
        """Whether the queue takes (or holds, while it recovers) the envelopes of ``room``."""
        return (self._first and room == self.room) or room in self._last

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms whose envelopes the queue takes (or holds while they recover)."""
        return frozenset((self.room, *self._last) if self._first else self._last)

    def recovering(self, room: str) -> bool:
        """Whether ``room`` was added and is not live yet."""
        return room in self._recovering or (
            self.state is ConnectionState.RECOVERING and self.follows(room)
        )

    @property
    def delivered(self) -> int:
        """Frames written to the transport."""
        return self._delivered

    @property
    def dropped(self) -> int:
        """Frames queued but never written."""
        return self._dropped

    @property
    def closing(self) -> bool:
        """True once the queue was aborted: nothing more is queued or taken."""
        return self.state is ConnectionState.CLOSING or self.state is ConnectionState.CLOSED

    # -- filling (never blocks, never raises)

    def push(self, envelope: Envelope) -> None:
        """Queue a room envelope unless it is a duplicate or of a room the queue does not
        follow; hold it while its room recovers."""
        state = self.state
        if state is ConnectionState.OPEN:
            seq = envelope.seq
            room = envelope.room
            if self._first and room == self.room:
                if seq <= self._first_seq:
                    return
                self._first_seq = seq
            else:
                if self._recovering and room in self._recovering:
                    self._hold(envelope)
                    return
                last = self._last.get(room)
                if last is None or seq <= last:
                    return
                self._last[room] = seq
            # The hot path of every broadcast, once per recipient: _append, inlined.
            items = self._items
            size = envelope.size
            if len(items) >= self.queue_size or self._bytes + size > self.queue_bytes:
                self._append(envelope)
                return
            items.append(envelope)
            self._bytes += size
            if not self._ready:
                self._ready = True
                if self._on_ready is not None:
                    self._on_ready()
        elif state is ConnectionState.RECOVERING:
            self._hold(envelope)

    def push_message(self, message: ControlMessage) -> bool:
        """Queue a control message; false if the queue is closing (or the policy refused it)."""
        if self.state is ConnectionState.OPEN:
            return self._append(message)
        if self.state is ConnectionState.RECOVERING:
            return self._hold(message)
        return False

    def push_text(self, text: str) -> bool:
        """Deprecated: use `push_message` with a `ControlMessage`."""
        warnings.warn(
            "OutboundQueue.push_text() is deprecated: use push_message(ControlMessage(...))",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.push_message(ControlMessage.from_text(text))

    def push_control(self, type: str, data: JsonValue = None, room: str | None = None) -> bool:
        """Queue `ControlMessage(type, room, data)` (`room` defaults to the first room); see
        `push_message`."""
        return self.push_message(ControlMessage(type, self.room if room is None else room, data))

    def reset(self, epoch: str, after_seq: int, room: str | None = None) -> None:
        """A room's stream was reset (or has a gap): tell the client ``history_lost``.

        The frame carries the new ``epoch`` and comes before any envelope of the room that
        follows the reset; its envelopes numbered after ``after_seq`` are then accepted again.
        ``room`` defaults to the first room; a room the queue does not follow is ignored.
        """
        room = self.room if room is None else room
        if not self.follows(room):
            return
        if self.state is ConnectionState.OPEN and room not in self._recovering:
            self._reset_now(room, epoch, after_seq)
        elif self.state is ConnectionState.OPEN or self.state is ConnectionState.RECOVERING:
            self._held.append(_Reset(room, epoch, after_seq))

    def _reset_now(self, room: str, epoch: str, after_seq: int) -> None:
        since = self.last_seq_of(room)
        if since is None:
            return
        self._set_seq(room, after_seq)
        lost = ControlMessage.history_lost(
            room, since=since, epoch=epoch, first_seq=after_seq + 1, last_seq=after_seq
        )
        self._append(lost)

    def go_live(self, after_seq: int) -> None:
        """End recovery: the client has everything up to ``after_seq``; queue what follows.

        Held envelopes numbered up to ``after_seq`` are dropped as duplicates (already sent
        from history, or older than the client's own ``join``).
        """
        if self.state is not ConnectionState.RECOVERING:
            return
        self.state = ConnectionState.OPEN
        if self._first:
            self._first_seq = max(self._first_seq, after_seq)
        held, self._held = self._held, []
        self._held_count = self._held_bytes = 0
        self._release(held)

    def _release(self, held: list[OutboundMessage | _Reset]) -> None:
        for item in held:
            if isinstance(item, _Reset):
                self._reset_now(item.room, item.epoch, item.after_seq)
            elif isinstance(item, ControlMessage):
                self._append(item)
            else:
                self.push(item)
            if self.closing:
                return

    # -- rooms joined and left while open

    def add_room(self, room: str) -> bool:
        """Follow ``room`` too; its envelopes are held until `room_live`.

        False (nothing changes) if the queue follows it already or is closing.
        """
        if self.follows(room) or self.closing:
            return False
        self._last[room] = 0
        if self.state is ConnectionState.OPEN:
            self._recovering += (room,)
        return True

    def fits(self, item: OutboundMessage) -> bool:
        """Whether ``item`` can be queued now without the slow-consumer policy (an empty
        queue takes anything): what a history replay waits for."""
        return not self._items or (
            len(self._items) < self.queue_size and self._bytes + item.size <= self.queue_bytes
        )

    def push_replay(self, item: OutboundMessage) -> bool:
        """Queue a frame of a recovering room's history (the caller checked `fits`)."""
        return self._append(item)

    def room_live(self, room: str, after_seq: int, ack: ControlMessage | str | None = None) -> None:
        """End ``room``'s recovery: the client has its envelopes up to ``after_seq``.

        ``ack`` (a control message, say ``joined``) is queued first; then the envelopes held
        for the room, less duplicates, in order.
        """
        if room not in self._recovering or self.state is not ConnectionState.OPEN:
            return
        self._recovering = tuple(other for other in self._recovering if other != room)
        self._last[room] = max(self._last[room], after_seq)  # never the first: added ones
        if ack is not None and not self._append(_control(ack)):
            return
        mine = [item for item in self._held if _room_of(item) == room]
        if mine:
            self._held = [item for item in self._held if _room_of(item) != room]
            self._held_count -= sum(1 for item in mine if not isinstance(item, _Reset))
            self._held_bytes -= sum(item.size for item in mine if not isinstance(item, _Reset))
            self._release(mine)

    def remove_room(self, room: str, ack: ControlMessage | str | None = None) -> bool:
        """Stop following ``room``: its envelopes still queued or held are dropped and none
        is queued after ``ack`` (a control message, say ``left``). False if not following it."""
        if not self.follows(room) or self.closing:
            return False
        if self._first and room == self.room:
            self._first = False
        else:
            del self._last[room]
        self._recovering = tuple(other for other in self._recovering if other != room)
        held = [item for item in self._held if _room_of(item) == room]
        if held:
            self._held = [item for item in self._held if _room_of(item) != room]
            envelopes = [item for item in held if not isinstance(item, _Reset)]
            self._held_count -= len(envelopes)
            self._held_bytes -= sum(item.size for item in envelopes)
            self._dropped += len(envelopes)
        items = self._items
        kept = [item for item in items if not (isinstance(item, Envelope) and item.room == room)]
        if len(kept) != len(items):
            self._dropped += len(items) - len(kept)
            self._bytes = sum(item.size for item in kept)
            self._items = kept
        if ack is not None:
            self._append(_control(ack))
        return True

    def _hold(self, item: OutboundMessage) -> bool:
        """Hold a live frame while recovering, under the same bounds and policy as the queue
        (a held reset is never dropped: it is what tells the client)."""
        held = self._held
        size = item.size
        while self._held_count and (
            self._held_count >= self.queue_size or self._held_bytes + size > self.queue_bytes
        ):
            if self.policy is not SlowConsumerPolicy.DROP_OLDEST:
                self.overflowed = True
                self.abort(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue full")
                return False
            index = next(i for i, old in enumerate(held) if not isinstance(old, _Reset))
            dropped = held.pop(index)
            assert not isinstance(dropped, _Reset)
            self._held_count -= 1
            self._held_bytes -= dropped.size
            self._dropped += 1
        held.append(item)
        self._held_count += 1
        self._held_bytes += size
        return True

    def _append(self, item: OutboundMessage) -> bool:
        items = self._items
        size = item.size
        # Frames being written sit outside the bounds: at most one more queue's worth.
        while items and (len(items) >= self.queue_size or self._bytes + size > self.queue_bytes):
            if not self._make_room(items, size):
                return False
        if self.state is not ConnectionState.OPEN:
            return False
        items.append(item)
        self._bytes += size
        if not self._ready:
            self._ready = True
            if self._on_ready is not None:
                self._on_ready()
        return True

    def _make_room(self, items: list[OutboundMessage], size: int) -> bool:
        """Apply the policy to a full queue; true if the oldest frame made way."""
        if self.policy is SlowConsumerPolicy.DROP_OLDEST:
            # The oldest envelope: history holds it for a resume, while a control message
            # (an error, a history_lost) exists nowhere else. Only controls: the oldest.
            index = next((i for i, old in enumerate(items) if isinstance(old, Envelope)), 0)
            self._bytes -= items.pop(index).size
            self._dropped += 1
            return True
        self.overflowed = True
        self.abort(CloseCode.SLOW_CONSUMER, "slow consumer: outbound queue full")
        return False

    # -- draining (the writer)

    @property
    def has_frames(self) -> bool:
        """Whether `take` would return anything."""
        return bool(self._items) and self.state is ConnectionState.OPEN

    def peek(self) -> list[OutboundMessage]:
        """The frames waiting now, in order, left in the queue (for a write that may refuse)."""
        return self._items if self.state is ConnectionState.OPEN else []

    def take(self) -> list[OutboundMessage]:
        """Hand every waiting frame to the writer, in order; they count as queued until
        `sent` (or as dropped if the queue aborts first). Empty: the writer is idle
        and `on_ready` will be called for the next frame."""
        items = self._items
        if not items or self.state is not ConnectionState.OPEN:
            self._ready = False
            return []
        self._items = []
        self._unsent += len(items)
        self._unsent_bytes += self._bytes
        self._bytes = 0
        return items

    def sent(self, count: int) -> None:
        """The writer wrote ``count`` more of the frames it took to the socket."""
        if self.closing:
            return
        self._unsent -= count
        if not self._unsent:
            self._unsent_bytes = 0
        self._delivered += count

    def flushed(self) -> None:
        """Everything `peek` returned was written at once (the no-wait path): the queue
        is empty and idle, and ``on_ready`` will be called for the next frame."""
        self._delivered += len(self._items)
        self._items = []
        self._bytes = 0
        self._ready = False

    def count_delivered(self, count: int) -> None:
        """``count`` frames that bypassed the queue (history replay) were written."""
        self._delivered += count

    def idle(self) -> None:
        """The writer stopped with nothing taken: the next frame calls ``on_ready`` again."""
        self._ready = False

    # -- closing

    def abort(self, code: int, reason: str) -> bool:
        """Stop at once: drop everything, move to CLOSING; true the first time only.

        Never blocks. ``on_abort`` is called on the first abort, for the I/O layer to close.
        """
        if self.closing:
            return False
        self.state = ConnectionState.CLOSING
        self.close_code = code
        self.close_reason = reason
        self._dropped += len(self._items) + self._unsent
        self._dropped += self._held_count
        self._items = []
        self._held = []
        self._held_count = self._held_bytes = 0
        self._bytes = self._unsent = self._unsent_bytes = 0
        if self._on_abort is not None:
            self._on_abort()
        return True

    def set_closed(self) -> None:
        """The I/O layer finished closing (socket closed, presence updated).

        The callbacks are let go: they refer to the connection that holds this queue, and a
        closed connection should be freed by reference counting, not wait for the garbage
        collector's next full pass (see docs/performance.md).
        """
        self.state = ConnectionState.CLOSED
        self._on_ready = self._on_abort = None


def _control(ack: ControlMessage | str) -> ControlMessage:
    """`ack` as a control message; a text (what 0.1 took) is deprecated."""
    if isinstance(ack, str):
        warnings.warn(
            "an ack given as text is deprecated: give a ControlMessage",
            DeprecationWarning,
            stacklevel=3,
        )
        return ControlMessage.from_text(ack)
    return ack


def _room_of(item: OutboundMessage | _Reset) -> str | None:
    """The room whose recovery holds `item` back: None for a control message, which is
    released with whatever is live."""
    return None if isinstance(item, ControlMessage) else item.room
