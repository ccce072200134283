"""No silent hole: a hostile payload is refused with no seq consumed, or reaches everyone.

``broadcast(room, data, client_id)`` either raises :class:`~wsbroadcast.InvalidData` and the
next broadcast takes the next seq (history shows no hole), or returns an envelope that every
member of the room (plain and fast-path transports, several of each) receives with identical
JSON text, in seq order, gap-free, and that a late client recovers from history with
``since`` and ``epoch``. After every example every member holds exactly the seqs it is owed.
"""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st

from wsbroadcast import ConnectionManager, InvalidData, user_room
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.testing import MemoryBatchTransport, MemoryTransport

ROOM = "room"
KINDS: tuple[type[MemoryTransport], ...] = (MemoryTransport, MemoryBatchTransport)


# -- hostile JSON-like values


def nest(leaf: object, depth: int, shape: str) -> object:
    """``leaf`` wrapped in ``depth`` lists, dicts, or both alternately (no recursion)."""
    value = leaf
    for level in range(depth):
        as_dict = shape == "dict" or (shape == "mixed" and level % 2)
        value = {"k": value} if as_dict else [value]
    return value


class Huge:
    """``sign * 10**exponent``, made only when broadcast: its repr stays short (Python refuses
    to print an int of more than 4300 digits, which would hide a falsifying example)."""

    def __init__(self, exponent: int, sign: int = 1) -> None:
        self.exponent = exponent
        self.sign = sign

    def __repr__(self) -> str:
        return f"{'-' if self.sign < 0 else ''}10**{self.exponent}"


def materialize(value: object) -> object:
    """``value`` with every :class:`Huge` made a real int (containers rebuilt, keys kept)."""
    if isinstance(value, Huge):
        return value.sign * 10**value.exponent
    if isinstance(value, list):
        return [materialize(item) for item in value]
    if isinstance(value, tuple):
        return tuple(materialize(item) for item in value)
    if isinstance(value, dict):
        return {key: materialize(item) for key, item in value.items()}
    return value


LONE_SURROGATES = ["\ud800", "a\udfffb", "\udbff", "x\udc00", "\ud83d"]
surrogate_text = st.one_of(
    st.sampled_from(LONE_SURROGATES),
    st.text(st.one_of(st.characters(categories=["Cs"]), st.characters()), min_size=1, max_size=8),
)
control_text = st.text(st.characters(max_codepoint=0x1F), max_size=16)
long_text = st.builds(
    lambda unit, count: unit * count,
    st.sampled_from(["x", "é", "\x00", "\U0001f600", "\u2028", '"\\', "\ud800"]),
    st.integers(1, 100_000),
)
edge_ints = st.one_of(
    st.integers(-(2**63) - 2, -(2**63) + 2),
    st.integers(2**63 - 2, 2**63 + 2),
    st.integers(2**64 - 2, 2**64 + 2),
    st.sampled_from([10**30, -(10**30), Huge(5000), Huge(5000, -1)]),
    st.integers(),
)
edge_floats = st.one_of(
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, -1e308, 5e-324]),
)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    edge_ints,
    edge_floats,
    st.text(max_size=16),
    surrogate_text,
    control_text,
    long_text,
)
keys = st.one_of(
    st.text(max_size=8),
    surrogate_text,
    control_text,
    st.integers(),
    st.booleans(),
    st.none(),
    st.floats(),
    st.tuples(st.integers()),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
        st.tuples(children),
        st.tuples(children, children),
    ),
    max_leaves=8,
)
deep = st.builds(nest, trees, st.integers(1, 300), st.sampled_from(["list", "dict", "mixed"]))
# Valid but awkward JSON, so that many examples are delivered, not only refused.
valid_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64 - 1, -0.0, 1e308, -1e308, 5e-324]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
    control_text,
    st.builds(
        lambda unit, count: unit * count,
        st.sampled_from(["x", "é", "\x00", "\U0001f600", "\u2028", '"\\']),
        st.integers(1, 100_000),
    ),
)
valid_trees = st.recursive(
    valid_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)
valid_deep = st.builds(nest, valid_trees, st.integers(1, 70), st.sampled_from(["list", "dict"]))
payloads = st.one_of(trees, deep, valid_trees, valid_deep)


def note_outcome(outcome: str) -> None:
    if currently_in_test_context():
        event(outcome)


def strict_json(text: str) -> Any:
    """Parse as a strict JSON client would: UTF-8 encodable, no NaN or Infinity."""
    text.encode("utf-8")  # a WebSocket text frame is UTF-8: a lone surrogate cannot be sent

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def last_seq(transport: MemoryTransport) -> int:
    return int(json.loads(transport.texts[-1]).get("seq", 0)) if transport.texts else 0


# -- the scenario

BIG = 64 * 1024 * 1024


async def broadcast_each(values: list[Any]) -> None:
    """Members join (some with ``since=0``, so they are owed 1..N), then each value is
    broadcast; then two late clients resume from the seq before the first value."""
    # Bounds large enough for four ~1 MB payloads (100,000 control characters escape to 600 kB
    # each): the byte bounds themselves are attacked in test_outbound and backends/test_memory.
    backend = MemoryBackend(history_bytes=BIG)
    async with ConnectionManager(backend, queue_bytes=BIG) as manager:
        members: list[tuple[MemoryTransport, int]] = []  # (transport, first seq owed)
        for i in range(6):
            transport = KINDS[i % 2]()
            since = 0 if i < 4 else None
            await manager.connect(transport, f"member{i}", ROOM, since=since)
            members.append((transport, 1 if since == 0 else i + 1))
        before = last = len(members)
        returned: dict[int, str] = {}
        for value in values:
            try:
                envelope = await manager.broadcast(ROOM, value, "sender")
            except InvalidData:
                note_outcome("refused")
                probe = await manager.broadcast(ROOM, "probe after a refusal", "sender")
                assert probe.seq == last + 1, "a refused broadcast consumed a seq"
                last = probe.seq
                returned[probe.seq] = probe.text
                continue
            note_outcome("delivered")
            assert envelope.seq == last + 1
            last = envelope.seq
            returned[envelope.seq] = envelope.text
            strict_json(envelope.text)

        history = await backend.history(ROOM, 0)
        assert history.complete
        assert [e.seq for e in history.envelopes] == list(range(1, last + 1)), "a hole"
        for seq, text in returned.items():
            assert history.envelopes[seq - 1].text == text

        # Late clients of both kinds resume from the seq before the first value.
        late = [(kind(), before + 1) for kind in KINDS]
        for i, (transport, _) in enumerate(late):
            await manager.connect(transport, f"late{i}", ROOM, since=before, epoch=history.epoch)
        final = last + len(late)

        history = await backend.history(ROOM, 0)
        canonical = {e.seq: e.text for e in history.envelopes}
        assert sorted(canonical) == list(range(1, final + 1))
        with anyio.fail_after(10):  # hang guard: a member left behind never catches up
            for transport, _ in members + late:
                await transport.wait_until(lambda t: last_seq(t) >= final)
        for n, (transport, first) in enumerate(members + late):
            seqs = [json.loads(frame).get("seq") for frame in transport.texts]
            assert seqs == list(range(first, final + 1)), f"client {n} was left behind"
            assert transport.texts == [canonical[seq] for seq in seqs], "texts differ"
            for frame in transport.texts:
                strict_json(frame)


# -- the tests


@pytest.mark.parametrize("async_backend", ["asyncio", "trio"])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(values=st.lists(payloads, min_size=1, max_size=4))
@example(values=[nest(0, 254, "list")])
@example(values=[{"message": "\ud800"}])
@example(values=[{"\ud800": 1}, "a\udfffb", 2**64, -(2**63) - 1, Huge(5000)])
@example(values=[nest("x", 300, "mixed"), math.nan, {1: 2}, (1, 2), -0.0, 1e308])
def test_a_hostile_payload_is_refused_whole_or_delivered_to_everyone(
    async_backend: str, values: list[Any]
) -> None:
    anyio.run(broadcast_each, [materialize(value) for value in values], backend=async_backend)


def cyclic() -> list[object]:
    loop: list[object] = [1]
    loop.append(loop)
    return loop


HOSTILE = {
    "list_254_deep": nest(0, 254, "list"),
    "dict_300_deep": nest(None, 300, "dict"),
    "lone_surrogate_value": {"message": "\ud800"},
    "lone_surrogate_key": {"\ud800": "x"},
    "surrogate_inside_text": "a\udfffb",
    "int_2_64": 2**64,
    "int_below_i64": -(2**63) - 1,
    "int_10_30": [10**30],
    "int_10_5000": {"n": 10**5000},
    "nan": [math.nan],
    "infinity": {"x": -math.inf},
    "non_string_key": {1: "one"},
    "tuple": (1, [2]),
    "long_string": "é" * 100_000,
    "control_chars": "\x00\x01\x1f\x7f\u2028",
    "self_referential": cyclic(),
    "edge_values": [2**64 - 1, -(2**63), -0.0, 1e308, True, None],
}


@pytest.mark.parametrize("value", list(HOSTILE.values()), ids=list(HOSTILE))
@pytest.mark.anyio
async def test_a_named_hostile_payload_leaves_no_hole(value: Any) -> None:
    await broadcast_each([value, "after"])


async def send_direct_each(values: list[Any]) -> None:
    """Direct messages from ``alice`` (two tabs) to ``bob`` (two tabs): each is refused
    whole (no seq taken in either personal stream) or reaches all four tabs intact, once."""
    backend = MemoryBackend(history_bytes=BIG)
    async with ConnectionManager(backend, queue_bytes=BIG) as manager:
        tabs: dict[str, list[MemoryTransport]] = {"alice": [], "bob": []}
        for client_id, transports in tabs.items():
            for kind in KINDS:
                transport = kind()
                connection = await manager.connect(transport, client_id, ROOM)
                await manager.join(connection, user_room(client_id))
                transports.append(transport)
        sent: list[str] = []
        for value in values:
            try:
                envelope = await manager.send_direct("bob", value, "alice")
            except InvalidData:
                note_outcome("refused")
                continue
            note_outcome("delivered")
            strict_json(envelope.text)
            sent.append(envelope.id)
        probe = await manager.send_direct("bob", "probe", "alice")
        sent.append(probe.id)
        for client_id, transports in tabs.items():
            stream = user_room(client_id)
            history = await backend.history(stream, 0)
            # No hole: every seq of the stream is a message that was accepted, in order.
            assert [e.id for e in history.envelopes] == sent, client_id
            assert [e.seq for e in history.envelopes] == list(range(1, len(sent) + 1))
            with anyio.fail_after(10):
                for transport in transports:
                    await transport.wait_until(lambda t: probe.id in "".join(t.texts))
            texts = {e.seq: e.text for e in history.envelopes}
            for transport in transports:
                direct = [f for f in transport.texts if json.loads(f).get("room") == stream]
                seqs = [json.loads(f).get("seq") for f in direct if "seq" in json.loads(f)]
                assert seqs == sorted(texts), client_id  # once each, in order
                assert [f for f in direct if "seq" in json.loads(f)] == [texts[s] for s in seqs]
                for frame in transport.texts:
                    strict_json(frame)


@pytest.mark.parametrize("async_backend", ["asyncio", "trio"])
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(values=st.lists(payloads, min_size=1, max_size=3))
@example(values=[{"message": "\ud800"}, nest(0, 64, "list"), 2**64])
def test_a_hostile_direct_message_is_refused_in_both_streams_or_reaches_every_tab(
    async_backend: str, values: list[Any]
) -> None:
    anyio.run(send_direct_each, [materialize(value) for value in values], backend=async_backend)
