"""Close codes and control messages (`wsbroadcast.control`): text, size, cached frame, builders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from wsbroadcast import RESERVED_TYPES, CloseCode, ControlMessage, Envelope
from wsbroadcast.control import ControlMessage as ControlMessageFromModule
from wsbroadcast.frames import text_frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def test_the_package_and_the_module_export_the_same_class() -> None:
    assert ControlMessage is ControlMessageFromModule


@given(st.text(min_size=1, max_size=20), st.none() | st.text(max_size=20), json_values)
def test_text_is_the_compact_json_object_of_type_room_and_data(
    type: str, room: str | None, data: object
) -> None:
    message = ControlMessage(type, room, data)  # type: ignore[arg-type]
    assert json.loads(message.text) == {"type": type, "room": room, "data": data}
    assert list(json.loads(message.text)) == ["type", "room", "data"]
    assert (message.type, message.room, message.data) == (type, room, data)
    assert message.size == len(message.text.encode())


def test_text_keeps_non_ascii_as_is_and_has_no_spaces() -> None:
    message = ControlMessage("notice", "lobby", {"text": "héllo ✓"})
    assert message.text == '{"type":"notice","room":"lobby","data":{"text":"héllo ✓"}}'
    assert message.size == len(message.text.encode()) > len(message.text)


def test_data_defaults_to_null() -> None:
    assert ControlMessage("ping", None).text == '{"type":"ping","room":null,"data":null}'


@given(st.text(max_size=300))
def test_frame_is_one_unmasked_text_frame_of_the_text_built_once(detail: str) -> None:
    message = ControlMessage.error("bad", detail)
    frame = message.frame
    expected = Frame(Opcode.TEXT, message.text.encode()).serialize(mask=False, extensions=[])
    assert frame == expected == text_frame(message.text.encode())
    assert message.frame is frame  # cached


def test_a_control_message_has_what_an_envelope_has_for_the_writers() -> None:
    for name in ("text", "size", "frame", "room", "type"):
        assert hasattr(ControlMessage("t", "r"), name)
        assert name in Envelope.model_fields or hasattr(Envelope, name)


def test_the_builders_make_the_documented_messages() -> None:
    assert json.loads(ControlMessage.error("invalid", "no", "red").text) == {
        "type": "error",
        "room": "red",
        "data": {"code": "invalid", "detail": "no"},
    }
    assert ControlMessage.error("invalid", "no").room is None
    lost = ControlMessage.history_lost("red", since=9, epoch="e2", first_seq=5, last_seq=12)
    assert json.loads(lost.text) == {
        "type": "history_lost",
        "room": "red",
        "data": {"since": 9, "epoch": "e2", "first_seq": 5, "last_seq": 12},
    }
    assert json.loads(ControlMessage.joined("red", seq=3, epoch="e1").text) == {
        "type": "joined",
        "room": "red",
        "data": {"seq": 3, "epoch": "e1"},
    }
    assert ControlMessage.left("red").text == '{"type":"left","room":"red","data":null}'


def test_every_builder_makes_a_reserved_type() -> None:
    built = {
        ControlMessage.error("c", "d").type,
        ControlMessage.history_lost("r", since=0, epoch="e", first_seq=1, last_seq=0).type,
        ControlMessage.joined("r", seq=0, epoch="e").type,
        ControlMessage.left("r").type,
    }
    assert built <= RESERVED_TYPES


def test_reserved_types_are_the_control_types_and_direct() -> None:
    assert frozenset({"direct", "error", "history_lost", "joined", "left", "presence"}) == (
        RESERVED_TYPES
    )
    assert "message" not in RESERVED_TYPES


def test_messages_are_equal_by_text() -> None:
    assert ControlMessage.left("red") == ControlMessage("left", "red", None)
    assert ControlMessage.left("red") != ControlMessage.left("blue")
    assert len({ControlMessage.left("red"), ControlMessage("left", "red")}) == 1
    assert ControlMessage.left("red") != '{"type":"left","room":"red","data":null}'
    assert "left" in repr(ControlMessage.left("red"))


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ('{"type":"error","room":"red","data":{"code":"x"}}', ("error", "red", {"code": "x"})),
        ('{"type":"notice","room":null}', ("notice", None, None)),
        ("not json", ("", None, None)),
        ("[1, 2]", ("", None, None)),
    ],
)
def test_from_text_keeps_the_text_and_reads_what_it_can(
    text: str, fields: tuple[str, str | None, object]
) -> None:
    message = ControlMessage.from_text(text)
    assert message.text == text
    assert (message.type, message.room, message.data) == fields
    assert message.size == len(text.encode())
    assert message.frame == text_frame(text.encode())


def test_close_codes() -> None:
    assert int(CloseCode.SLOW_CONSUMER) == 4008
    assert int(CloseCode.GOING_AWAY) == 1001
    assert all(1000 <= code < 5000 for code in CloseCode)
