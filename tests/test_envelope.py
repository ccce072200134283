from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from datetime import datetime, timezone

import pydantic
import pytest

from wsbroadcast import Envelope
from wsbroadcast.envelope import Draft


def make(**overrides: object) -> Envelope:
    fields: dict[str, object] = {
        "type": "message",
        "room": "lobby",
        "seq": 7,
        "id": "abc",
        "client_id": "alice",
        "timestamp": datetime(2026, 11, 25, 12, 0, 0, 123456, tzinfo=timezone.utc),
        "data": {"message": "héllo <b>"},
    }
    fields.update(overrides)
    return Envelope.model_validate(fields)


def test_wire_form_has_fields_in_documented_order_and_offset_timestamp() -> None:
    envelope = make()
    decoded = json.loads(envelope.text)
    assert list(decoded) == ["type", "room", "seq", "epoch", "id", "client_id", "timestamp", "data"]
    assert decoded["timestamp"] == "2026-11-25T12:00:00.123456+00:00"
    assert decoded["data"] == {"message": "héllo <b>"}


def test_text_is_encoded_once_and_shared() -> None:
    envelope = make()
    assert envelope.text is envelope.text


def test_from_text_round_trips_and_keeps_the_exact_text() -> None:
    original = make()
    text = original.text
    parsed = Envelope.from_text(text)
    assert parsed == original
    assert parsed.text is text


def test_envelopes_are_immutable() -> None:
    envelope = make()
    with pytest.raises(pydantic.ValidationError):
        envelope.seq = 8


@pytest.mark.parametrize("bad", [{"seq": 0}, {"extra": 1}, {"data": float("nan")}])
def test_invalid_envelopes_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        make(**bad)


def test_envelope_ids_are_random_hex_and_never_repeat() -> None:
    # More ids than one block from the OS, so that a refill is crossed.
    ids = [Draft("message", "lobby", "alice", i).id for i in range(1_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", id_) for id_ in ids)


def test_threads_never_share_an_envelope_id() -> None:
    def take(out: list[str]) -> None:
        out.extend(Draft("message", "lobby", None).id for _ in range(2_000))

    results: list[list[str]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=take, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [id_ for out in results for id_ in out]
    assert len(ids) == 8_000
    assert len(set(ids)) == len(ids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_does_not_repeat_its_parents_ids() -> None:
    # In a fresh interpreter: pytest's own threads would make fork() warn.
    code = """if True:
        import os, sys
        from wsbroadcast.envelope import Draft
        Draft("message", "lobby", None)  # the parent holds a block of ids
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, Draft("message", "lobby", None).id.encode())
            os._exit(0)
        os.waitpid(pid, 0)
        print(os.read(read, 64).decode(), Draft("message", "lobby", None).id)
    """
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    child, parent = done.stdout.split()
    assert child != parent


def test_names_that_need_escaping_are_escaped_in_the_text() -> None:
    """Names are written without json.dumps when they are plain; others are escaped."""
    draft = Draft("message", "salle-é", 'zoë "z"', {"n": 1})
    envelope = draft.envelope(1, "e")
    parsed = json.loads(envelope.text)
    assert (parsed["room"], parsed["client_id"]) == ("salle-é", 'zoë "z"')
    assert Envelope.from_text(envelope.text) == envelope
