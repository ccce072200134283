from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from wsbroadcast import ControlMessage, Envelope, OutboundMessage
from wsbroadcast.frames import text_frame
from wsbroadcast.outbound import frames_of


@given(
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from([125, 126, 127, 65535, 65536, 70000]).map(lambda n: b"x" * n),
    )
)
def test_text_frame_is_what_websockets_serialises_for_a_server(payload: bytes) -> None:
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected


@given(st.lists(st.one_of(st.text(max_size=200), st.integers(0, 10**6)), max_size=8))
def test_frames_of_puts_each_message_s_frame_back_to_back(items: list[str | int]) -> None:
    batch: list[OutboundMessage] = [
        ControlMessage("notice", None, item)
        if isinstance(item, str)
        else Envelope(
            type="message",
            room="r",
            seq=item + 1,
            id=f"e{item}",
            client_id="c",
            timestamp=datetime.now(timezone.utc),
            data=item,
        )
        for item in items
    ]
    expected = b"".join(text_frame(item.text.encode()) for item in batch)
    assert frames_of(batch) == expected
