from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from wsbroadcast.frames import text_frame


@given(
    st.one_of(
        st.binary(max_size=300),
        st.sampled_from([125, 126, 127, 65535, 65536, 70000]).map(lambda n: b"x" * n),
    )
)
def test_text_frame_is_what_websockets_serialises_for_a_server(payload: bytes) -> None:
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
    assert text_frame(payload) == expected
