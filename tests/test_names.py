"""The name grammar (wsbroadcast.names): what a room, a client id and a type may be."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsbroadcast import (
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    ConnectionManager,
    InvalidName,
    check_name,
    is_valid_name,
)
from wsbroadcast.testing import MemoryTransport

ALLOWED = string.ascii_letters + string.digits + "_.-:#@"
GOOD = ["chat:lobby", "user#42", "orders.eu-1", "alice@example.com", "a", "x" * 64]
BAD = ["", "x" * 65, "a b", "a\nb", "a\x00b", "a\tb", "a/b", "a{b}", "a+b", "a%20", "é", "a?b"]


@pytest.mark.parametrize("name", GOOD)
@pytest.mark.parametrize("field", ["room", "client_id", "type"])
def test_good_names_are_accepted(field: str, name: str) -> None:
    assert check_name(field, name) == name
    assert is_valid_name(name)


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(InvalidName) as caught:
        check_name("room", name)
    assert caught.value.field == "room"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "must not be empty"),
        ("x" * 65, "must be at most 64 characters"),
        ("a b", "must not contain ' ': only A-Z a-z 0-9 _ . - : # @ are allowed"),
        ("é", "must not contain 'é'"),
        (42, "must be a string"),
    ],
)
def test_the_reason_is_precise(name: object, reason: str) -> None:
    with pytest.raises(InvalidName) as caught:
        check_name("client_id", name)
    assert caught.value.reason.startswith(reason)


def test_the_pattern_is_the_grammar() -> None:
    assert NAME_MAX_LENGTH == 64
    assert isinstance(NAME_PATTERN, re.Pattern)
    assert NAME_PATTERN.fullmatch("user#42") is not None
    assert NAME_PATTERN.fullmatch("user#42\n") is None


@given(st.text(alphabet=ALLOWED, min_size=1, max_size=NAME_MAX_LENGTH))
def test_any_name_of_the_allowed_characters_is_accepted(name: str) -> None:
    assert is_valid_name(name)
    assert check_name("type", name) == name


@given(
    st.text(alphabet=ALLOWED, max_size=30),
    st.characters(blacklist_characters=ALLOWED),
    st.text(alphabet=ALLOWED, max_size=30),
)
def test_any_name_with_another_character_is_refused(before: str, bad: str, after: str) -> None:
    name = before + bad + after
    assert not is_valid_name(name)
    with pytest.raises(InvalidName, match="must not contain"):
        check_name("room", name)


@given(st.text(alphabet=ALLOWED, min_size=NAME_MAX_LENGTH + 1))
def test_any_longer_name_is_refused(name: str) -> None:
    assert not is_valid_name(name)


@pytest.mark.anyio
async def test_namespaced_names_round_trip_through_the_manager(manager: ConnectionManager) -> None:
    alice = MemoryTransport()
    await manager.connect(alice, "alice@example.com", room="chat:lobby")
    await manager.connect(MemoryTransport(), "user#42", room="chat:lobby")
    sent = await manager.broadcast("chat:lobby", {"hi": 1}, "user#42", type="orders.eu-1")
    await alice.wait_for_messages(3)
    last = alice.envelopes()[-1]
    assert (last["room"], last["client_id"], last["type"]) == (
        "chat:lobby",
        "user#42",
        "orders.eu-1",
    )
    assert last["seq"] == sent.seq
    assert await manager.presence("chat:lobby") == ["alice@example.com", "user#42"]
