"""The sans-I/O outbound queue, without an event loop: bounds, policies, order, recovery."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import JsonValue

from wsbroadcast import (
    CloseCode,
    ConnectionState,
    ControlMessage,
    OutboundMessage,
    OutboundQueue,
    SlowConsumerPolicy,
)
from wsbroadcast.envelope import Draft, Envelope


def envelope(seq: int, data: JsonValue = None, epoch: str = "e1") -> Envelope:
    return Draft("message", "lobby", "alice", data).envelope(seq, epoch)


class Calls:
    def __init__(self) -> None:
        self.ready = 0
        self.aborted = 0

    def on_ready(self) -> None:
        self.ready += 1

    def on_abort(self) -> None:
        self.aborted += 1


def make(calls: Calls, **options: object) -> OutboundQueue:
    return OutboundQueue(
        "lobby",
        on_ready=calls.on_ready,
        on_abort=calls.on_abort,
        **options,  # type: ignore[arg-type]
    )


def seqs(items: list[OutboundMessage]) -> list[int | str]:
    return [item.seq if isinstance(item, Envelope) else item.type for item in items]


def test_frames_are_held_while_recovering_and_go_live_drops_what_history_covered() -> None:
    calls = Calls()
    queue = make(calls)
    for seq in (3, 4, 5):
        queue.push(envelope(seq))
    assert queue.take() == []
    assert calls.ready == 0
    queue.go_live(after_seq=4)
    assert queue.state is ConnectionState.OPEN
    assert calls.ready == 1
    assert seqs(queue.take()) == [5]


def test_duplicates_and_old_seqs_are_skipped_once_live() -> None:
    queue = make(Calls())
    queue.go_live(0)
    for seq in (1, 2, 2, 1, 3):
        queue.push(envelope(seq))
    assert seqs(queue.take()) == [1, 2, 3]


def test_on_ready_is_called_once_until_the_writer_goes_idle() -> None:
    calls = Calls()
    queue = make(calls)
    queue.go_live(0)
    queue.push(envelope(1))
    queue.push(envelope(2))
    assert calls.ready == 1
    assert seqs(queue.take()) == [1, 2]
    queue.sent(2)
    assert queue.take() == []  # empty: the writer is idle now
    queue.push(envelope(3))
    assert calls.ready == 2
    assert queue.statistics().delivered == 2


def test_disconnect_policy_aborts_with_4008_when_the_frame_count_is_reached() -> None:
    calls = Calls()
    queue = make(calls, queue_size=2)
    queue.go_live(0)
    for seq in (1, 2, 3):
        queue.push(envelope(seq))
    assert queue.state is ConnectionState.CLOSING
    assert (queue.close_code, queue.overflowed, calls.aborted) == (
        CloseCode.SLOW_CONSUMER,
        True,
        1,
    )
    assert queue.statistics().dropped == 2
    assert not queue.push_message(ControlMessage("late", "lobby"))
    queue.push(envelope(4))
    assert queue.statistics().queued == 0


def test_the_byte_bound_counts_control_frames_too() -> None:
    calls = Calls()
    queue = make(calls, queue_bytes=1000)
    queue.go_live(0)
    for _ in range(9):
        assert queue.push_control("notice", "x" * 60)
    assert queue.statistics().queued_bytes <= 1000
    assert queue.push_control("notice", "x" * 300) is False
    assert queue.close_code == CloseCode.SLOW_CONSUMER


def test_drop_oldest_keeps_the_newest_within_both_bounds() -> None:
    queue = make(Calls(), queue_size=3, queue_bytes=10_000, policy=SlowConsumerPolicy.DROP_OLDEST)
    queue.go_live(0)
    for seq in range(1, 11):
        queue.push(envelope(seq, "y" * 2000))
    stats = queue.statistics()
    assert stats.queued_bytes <= 10_000
    assert seqs(queue.take())[-1] == 10
    assert stats.dropped + stats.queued == 10
    assert queue.state is ConnectionState.OPEN


def test_held_frames_are_bounded_by_the_same_policy() -> None:
    calls = Calls()
    queue = make(calls, queue_size=2)
    for seq in (1, 2, 3):
        queue.push(envelope(seq))
    assert queue.state is ConnectionState.CLOSING
    assert calls.aborted == 1


def test_a_reset_while_recovering_is_told_in_order_and_restarts_the_seqs() -> None:
    queue = make(Calls())
    queue.push(envelope(7))
    queue.reset("e2", after_seq=0)
    queue.push(envelope(1, epoch="e2"))
    queue.go_live(after_seq=6)
    items = queue.take()
    assert seqs(items) == [7, "history_lost", 1]
    lost = json.loads(items[1].text)
    assert lost["data"] == {"since": 7, "epoch": "e2", "first_seq": 1, "last_seq": 0}


def test_a_live_reset_is_told_before_the_new_stream() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.push(envelope(41))
    queue.reset("e2", after_seq=0)
    queue.push(envelope(1, epoch="e2"))
    assert seqs(queue.take()) == [41, "history_lost", 1]


def test_abort_is_once_and_counts_frames_being_written_as_dropped() -> None:
    calls = Calls()
    queue = make(calls)
    queue.go_live(0)
    queue.push(envelope(1))
    queue.push(envelope(2))
    queue.take()
    queue.sent(1)
    assert queue.abort(CloseCode.GOING_AWAY, "bye")
    assert not queue.abort(CloseCode.NORMAL, "again")
    assert (queue.close_code, calls.aborted) == (CloseCode.GOING_AWAY, 1)
    stats = queue.statistics()
    assert (stats.delivered, stats.dropped, stats.queued) == (1, 1, 0)
    queue.set_closed()
    assert queue.state is ConnectionState.CLOSED


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("push"), st.integers(1, 40)),
            st.tuples(st.just("text"), st.integers(0, 300)),
            st.tuples(st.just("take"), st.integers(0, 5)),
        ),
        max_size=80,
    ),
    queue_size=st.integers(1, 8),
    queue_bytes=st.integers(200, 3000),
    policy=st.sampled_from(list(SlowConsumerPolicy)),
)
def test_bounds_order_and_accounting_hold_for_any_sequence(
    ops: list[tuple[str, int]], queue_size: int, queue_bytes: int, policy: SlowConsumerPolicy
) -> None:
    queue = make(Calls(), queue_size=queue_size, queue_bytes=queue_bytes, policy=policy)
    queue.go_live(0)
    accepted = 0
    written: list[int] = []
    for op, arg in ops:
        if op == "push":
            before = queue.last_seq
            queue.push(envelope(arg))
            accepted += arg > before and not queue.closing
        elif op == "text":
            accepted += queue.push_message(ControlMessage("t", None, {"pad": "z" * arg}))
        else:
            batch = queue.take()
            queue.sent(len(batch))
            written += [item.seq for item in batch if isinstance(item, Envelope)]
        stats = queue.statistics()
        if not queue.closing:
            assert stats.queued <= queue_size
            assert stats.queued_bytes <= max(queue_bytes, 400)  # one oversized frame alone
    assert written == sorted(set(written))  # in order, no duplicate
    stats = queue.statistics()
    if not queue.closing:
        assert stats.delivered + stats.dropped + stats.queued == accepted


def test_invalid_items_never_reach_the_queue() -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        envelope(1, "\ud800")


def test_held_frames_are_bounded_in_bytes_too() -> None:
    calls = Calls()
    queue = make(calls, queue_bytes=1000)
    queue.push(envelope(1, "y" * 400))
    queue.push(envelope(2, "y" * 400))
    assert queue.statistics().queued_bytes <= 1000
    queue.push(envelope(3, "y" * 400))
    assert queue.close_code == CloseCode.SLOW_CONSUMER
    assert calls.aborted == 1


def test_drop_oldest_while_recovering_never_drops_a_reset() -> None:
    queue = make(Calls(), queue_size=3, policy=SlowConsumerPolicy.DROP_OLDEST)
    queue.push(envelope(5))
    queue.reset("e2", after_seq=0)
    for seq in (1, 2, 3, 4):
        queue.push(envelope(seq, epoch="e2"))
    queue.go_live(after_seq=4)
    # Held: 5, the reset, 1..4 with 5 and 1 dropped; live, the queue holds three frames.
    assert seqs(queue.take()) == ["history_lost", 3, 4]
    assert queue.statistics().dropped == 3


def test_drop_oldest_keeps_control_frames_while_there_is_an_envelope_to_drop() -> None:
    queue = make(Calls(), queue_size=2, policy=SlowConsumerPolicy.DROP_OLDEST)
    queue.go_live(0)
    queue.push_control("notice", "keep me")
    for seq in (1, 2, 3):
        queue.push(envelope(seq))
    assert seqs(queue.take()) == ["notice", 3]


# -- several rooms


def in_room(room: str, seq: int, epoch: str = "e1") -> Envelope:
    return Draft("message", room, "alice", None).envelope(seq, epoch)


def rooms_and_seqs(items: list[OutboundMessage]) -> list[tuple[str | None, int | str]]:
    return [
        (item.room, item.seq) if isinstance(item, Envelope) else (item.room, item.type)
        for item in items
    ]


def test_each_room_has_its_own_seqs_and_rooms_not_followed_are_ignored() -> None:
    queue = make(Calls())
    queue.go_live(0)
    assert queue.add_room("red")
    queue.room_live("red", 0)
    for item in (in_room("lobby", 5), in_room("red", 1), in_room("blue", 1), in_room("red", 1)):
        queue.push(item)
    queue.push(in_room("lobby", 4))  # older than lobby's last: a duplicate
    queue.push(in_room("red", 2))
    assert rooms_and_seqs(queue.take()) == [("lobby", 5), ("red", 1), ("red", 2)]
    assert (queue.last_seq, queue.last_seq_of("red"), queue.last_seq_of("blue")) == (5, 2, None)
    assert queue.rooms == {"lobby", "red"}


def test_a_joining_room_is_held_while_the_others_flow_then_acked_before_its_live_frames() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.add_room("red")
    assert queue.recovering("red")
    queue.push(in_room("red", 7))
    queue.push(in_room("lobby", 1))
    queue.push(in_room("red", 8))
    assert rooms_and_seqs(queue.take()) == [("lobby", 1)]
    # History up to 7 was replayed: 7 is a duplicate, 8 follows the ack.
    queue.push_replay(in_room("red", 6))
    queue.push_replay(in_room("red", 7))
    queue.room_live("red", 7, ControlMessage("joined", "red"))
    assert not queue.recovering("red")
    assert rooms_and_seqs(queue.take()) == [("red", 6), ("red", 7), ("red", "joined"), ("red", 8)]


def test_a_reset_of_one_room_is_told_in_that_room_only() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.add_room("red")
    queue.room_live("red", 0)
    queue.push(in_room("lobby", 3))
    queue.push(in_room("red", 9))
    queue.reset("e2", 0, "red")
    queue.push(in_room("red", 1, "e2"))
    queue.push(in_room("lobby", 4))
    items = queue.take()
    assert rooms_and_seqs(items) == [
        ("lobby", 3), ("red", 9), ("red", "history_lost"), ("red", 1), ("lobby", 4),
    ]  # fmt: skip
    lost = json.loads(next(item.text for item in items if isinstance(item, ControlMessage)))
    assert lost["data"] == {"since": 9, "epoch": "e2", "first_seq": 1, "last_seq": 0}
    queue.reset("e3", 0, "blue")  # not followed: nothing
    assert queue.take() == []


def test_a_reset_while_a_room_recovers_is_held_in_order() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.add_room("red")
    queue.push(in_room("red", 4))
    queue.reset("e2", 0, "red")
    queue.push(in_room("red", 1, "e2"))
    queue.room_live("red", 3)
    assert rooms_and_seqs(queue.take()) == [("red", 4), ("red", "history_lost"), ("red", 1)]


def test_removing_a_room_drops_its_queued_and_held_frames_and_nothing_follows_the_ack() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.add_room("red")
    queue.room_live("red", 0)
    queue.add_room("blue")
    queue.push(in_room("blue", 1))  # held: blue recovers
    queue.push(in_room("red", 1))
    queue.push_message(ControlMessage("error", "red"))
    queue.push(in_room("lobby", 1))
    assert queue.remove_room("red", ControlMessage.left("red"))
    assert queue.remove_room("blue")
    assert not queue.remove_room("red")
    queue.push(in_room("red", 2))
    queue.push(in_room("blue", 2))
    assert rooms_and_seqs(queue.take()) == [("red", "error"), ("lobby", 1), ("red", "left")]
    stats = queue.statistics()
    assert (stats.dropped, stats.queued) == (2, 3)
    assert queue.rooms == {"lobby"}


def test_a_room_added_while_open_is_held_under_the_same_policy() -> None:
    queue = make(Calls(), queue_size=2)
    queue.go_live(0)
    queue.add_room("red")
    for seq in (1, 2, 3):
        queue.push(in_room("red", seq))
    assert queue.state is ConnectionState.CLOSING
    assert queue.close_code == CloseCode.SLOW_CONSUMER


def test_fits_says_when_a_replay_must_wait() -> None:
    queue = make(Calls(), queue_size=2)
    queue.go_live(0)
    queue.add_room("red")
    assert queue.fits(in_room("red", 1))
    queue.push_replay(in_room("red", 1))
    queue.push_replay(in_room("red", 2))
    assert not queue.fits(in_room("red", 3))
    queue.take()
    assert queue.fits(in_room("red", 3))
    assert not queue.add_room("red")


def test_the_first_room_can_be_left_and_joined_again() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.push(in_room("lobby", 1))
    assert rooms_and_seqs(queue.take()) == [("lobby", 1)]
    assert queue.remove_room("lobby")
    assert queue.rooms == frozenset()
    queue.push(in_room("lobby", 2))
    assert queue.add_room("lobby")
    queue.push(in_room("lobby", 3))  # held until live
    queue.room_live("lobby", 2)
    queue.push(in_room("lobby", 3))  # a duplicate
    queue.push(in_room("lobby", 4))
    assert rooms_and_seqs(queue.take()) == [("lobby", 3), ("lobby", 4)]
    assert (queue.last_seq, queue.rooms) == (4, frozenset({"lobby"}))


def test_an_idle_writer_is_woken_again_and_has_frames_says_what_take_would_give() -> None:
    calls = Calls()
    queue = make(calls)
    queue.push(envelope(1))
    assert not queue.has_frames  # held while recovering
    queue.go_live(0)
    queue.go_live(5)  # live already: no second release, no new position
    assert queue.has_frames
    assert calls.ready == 1
    queue.push(envelope(2))
    assert calls.ready == 1  # one wake-up until the writer takes
    assert seqs(queue.take()) == [1, 2]
    assert not queue.has_frames
    queue.push(envelope(3))
    assert calls.ready == 1  # the writer has not said it is idle
    queue.take()
    queue.idle()
    queue.push(envelope(4))
    assert calls.ready == 2
    queue.abort(CloseCode.GOING_AWAY, "bye")
    assert not queue.has_frames


def test_room_live_and_reset_ignore_rooms_that_are_not_recovering_or_followed() -> None:
    queue = make(Calls())
    queue.go_live(0)
    queue.room_live("lobby", 9, ack='{"type":"joined"}')  # the first room is not recovering
    queue.reset("e2", 3, room="red")  # a room the queue does not follow
    assert queue.take() == []
    assert queue.last_seq_of("red") is None
