"""The open-loop mode of the benchmark: the raw client, the paced sender, the verdicts, the
cost-split fit, the report section, and ``python -m bench --open-loop --smoke`` end to end.

Nothing here asserts a speed: the end-to-end run checks that every message was accounted for
and that the report was written, not whether a load was held.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.openloop import (
    OpenLoopResult,
    fit_cost_split,
    is_held,
    paced_send,
    verdict,
)
from bench.openreport import (
    BEGIN,
    END,
    existing_section,
    highest_held,
    replace_section,
    section,
)
from bench.protocols import PROTOCOLS
from bench.rawws import RawClient, client_frame
from bench.servers import SERVERS

ROOT = Path(__file__).resolve().parents[1]
SMOKE_DEADLINE = 90.0


def _server_frame(text: str) -> bytes:
    payload = text.encode()
    size = len(payload)
    if size < 126:
        return bytes([0x81, size]) + payload
    return bytes([0x81, 126]) + size.to_bytes(2, "big") + payload


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def test_raw_client_parses_frames_split_anywhere_and_answers_pings() -> None:
    async def scenario() -> tuple[list[bytes], list[bytes], RawClient]:
        got: list[bytes] = []
        client = RawClient(
            "127.0.0.1", 1, "/socket.io/", PROTOCOLS["socketio"], lambda p, _: got.append(p)
        )
        transport = FakeTransport()
        client.connection_made(transport)  # type: ignore[arg-type]
        stream = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
            + _server_frame('0{"sid":"x"}')
            + _server_frame("2")  # a ping before the join: answered, not passed on
            + _server_frame('40{"sid":"y"}')
            + _server_frame('42["chat_message",{"m":"~0~1~0~x"}]')
            + _server_frame("2")
            + _server_frame("42" + "y" * 300)  # a 16-bit length
        )
        for i in range(0, len(stream), 7):  # every frame and the handshake cut in pieces
            client.data_received(stream[i : i + 7])
        await asyncio.wait_for(client.ready, 1)
        return got, transport.written, client

    got, written, _ = asyncio.run(scenario())
    assert got == [b'42["chat_message",{"m":"~0~1~0~x"}]', b"42" + b"y" * 300]
    assert written[0].startswith(b"GET /socket.io/ HTTP/1.1\r\n")
    pong = client_frame(b"3")
    # The join ("40", masked), then two pongs: same header and length as a masked "3".
    assert [w[:2] for w in written[1:]] == [b"\x81\x82", pong[:2], pong[:2]]


def test_client_frames_are_masked_and_unmask_to_the_payload() -> None:
    for size in (0, 5, 125, 126, 70_000):
        payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
        frame = client_frame(payload)
        assert frame[0] == 0x81
        assert frame[1] & 0x80
        length, offset = frame[1] & 0x7F, 2
        if length == 126:
            length, offset = int.from_bytes(frame[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(frame[2:10], "big"), 10
        mask, body = frame[offset : offset + 4], frame[offset + 4 :]
        assert length == len(body) == size
        assert bytes(b ^ mask[i % 4] for i, b in enumerate(body)) == payload


class RecordingSender:
    def __init__(self) -> None:
        self.writes: list[tuple[float, bytes]] = []

    def write(self, frames: bytes) -> None:
        self.writes.append((time.monotonic(), frames))


def test_paced_send_deals_round_robin_on_a_clock_and_batches() -> None:
    senders = [RecordingSender(), RecordingSender(), RecordingSender()]
    started = time.monotonic()
    sent = asyncio.run(paced_send(senders, PROTOCOLS["plain"], 60, 1500.0, 8))  # type: ignore[arg-type]
    assert sent.sent == 60
    assert sent.first_send_ns <= sent.last_send_ns
    texts: list[list[str]] = [[] for _ in senders]
    for room, sender in enumerate(senders):
        for _, frames in sender.writes:
            # Unmask each frame of the batch (7-bit lengths: the texts are short).
            pos = 0
            while pos < len(frames):
                length = frames[pos + 1] & 0x7F
                mask = frames[pos + 2 : pos + 6]
                body = frames[pos + 6 : pos + 6 + length]
                texts[room].append(bytes(b ^ mask[i % 4] for i, b in enumerate(body)).decode())
                pos += 6 + length
    for room, received in enumerate(texts):
        counters = [json.loads(t)["message"].split("~") for t in received]
        assert [int(c[1]) for c in counters] == list(range(20))
        assert {int(c[3]) for c in counters} == {room}
    # Never more writes than messages (what was due at one wake-up goes out together), and
    # none before the start.
    assert sum(len(s.writes) for s in senders) <= 60
    assert min(at for s in senders for at, _ in s.writes) >= started


def _result(**fields: Any) -> OpenLoopResult:
    base: dict[str, Any] = {
        "server": "chat",
        "scenario": "dense",
        "clients": 500,
        "stalled": 0,
        "messages": 100,
        "sent": 100,
        "offered": 50_000.0,
        "deliveries_per_s": 49_000.0,
        "p99_ms": 20.0,
        "lost": 0,
    }
    base.update(fields)
    return OpenLoopResult(**base)


def test_held_needs_no_loss_ninety_percent_delivered_and_p99_within_100_ms() -> None:
    assert is_held(_result())
    assert not is_held(_result(lost=1))
    assert not is_held(_result(deliveries_per_s=44_000.0))
    assert not is_held(_result(p99_ms=101.0))
    assert not is_held(_result(error="server died"))
    assert verdict(_result(held=True)) == "held"
    assert verdict(_result(held=False)) == "not held"
    assert verdict(_result(held=True, generator_behind=True)) == "generator fell behind"


def test_highest_load_held_says_when_the_generator_fell_behind_above_it() -> None:
    runs = [
        _result(offered=50_000.0, held=True),
        _result(offered=100_000.0, held=True),
        _result(offered=150_000.0, held=False, generator_behind=True),
        _result(offered=200_000.0, held=False),
    ]
    text = highest_held(runs, "chat", "dense")
    assert text.startswith("**100,000/s**")
    assert "generator fell behind at 150,000/s" in text
    assert highest_held(runs[3:], "chat", "dense") == "none (lowest 200,000/s)"
    assert highest_held(runs[2:], "chat", "dense") == (
        "inconclusive (generator fell behind at 150,000/s)"
    )


def test_cost_split_fit_recovers_per_publish_and_per_delivery_costs() -> None:
    a, b = 30e-6, 5e-6  # seconds per publish, per frame written
    runs = []
    for size in (5, 20, 100):
        publishes = 100_000 // size
        deliveries = publishes * size
        cpu = a * publishes + b * (deliveries + publishes)
        runs.append(_result(scenario="split", sent=publishes, deliveries=deliveries, cpu_s=cpu))
        runs[-1].echoes = publishes
    fit = fit_cost_split(runs)
    assert fit is not None
    assert fit[0] == pytest.approx(30.0)
    assert fit[1] == pytest.approx(5.0)
    assert fit[2] == pytest.approx(0.0, abs=1e-9)
    assert fit_cost_split(runs[:2]) is None


def test_the_open_loop_section_replaces_only_itself(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nclosed-loop figures\n\n## Servers\n\n- chat\n")
    replace_section(doc, section(None, command="", elapsed=0, png_name=None))
    first = doc.read_text()
    assert "closed-loop figures" in first
    assert "## Servers\n\n- chat\n" in first
    assert first.index(BEGIN) < first.index(END) < first.index("## Servers")
    assert "Figures to be filled by the quiet run" in first
    new = section([_result(held=True)], command="python -m bench --open-loop", elapsed=1,
                  png_name=None)  # fmt: skip
    replace_section(doc, new)
    second = doc.read_text()
    assert second.count(BEGIN) == 1
    assert "Figures to be filled" not in second
    assert "closed-loop figures" in second
    assert "## Servers\n\n- chat\n" in second
    assert existing_section(doc) == new


def test_open_loop_smoke_run_accounts_for_every_message(tmp_path: Path) -> None:
    """chat and Node's ws through dense, rooms and the split; Node skipped with a reason if
    it cannot run here (the row says why)."""
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\nkept\n\n## Servers\n")
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--open-loop",
            "--smoke",
            "--servers",
            "chat,node",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SMOKE_DEADLINE,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(out.with_suffix(".json").read_text())["results"]
    node_reason = SERVERS["node"].unavailable_reason()
    layouts = {("dense", 1): 1, ("rooms", 2): 1, ("split", 6): 1, ("split", 3): 1, ("split", 2): 1}
    assert sorted((r["scenario"], r["rooms"], r["server"]) for r in results) == sorted(
        (scenario, rooms, server) for (scenario, rooms) in layouts for server in ("chat", "node")
    )
    for r in results:
        if r["server"] == "node" and node_reason is not None:
            assert r["error"] == f"skipped: {node_reason}"
            continue
        assert r["error"] == "", r
        assert r["clients"] == 6
        assert r["offered"] == 600
        assert r["sent"] == r["messages"] > 0
        assert r["expected"] == r["deliveries"] == r["sent"] * 6 // r["rooms"]
        assert r["echoes"] == r["sent"]  # the sender read its own copies without waiting
        assert r["lost"] == r["duplicates"] == r["out_of_order"] == r["wrong_room"] == 0
        assert r["failed_connects"] == r["closed_early"] == 0
        assert r["p99_ms"] > 0
        assert r["sender_lag_p99_ms"] >= 0
    report = out.read_text()
    assert "kept" in report
    assert report.index(END) < report.index("## Servers")
    assert "### Highest load held" in report
    assert "### Cost per publish and per delivery" in report
    assert "| chat |" in report
    assert "| node |" in report
    assert out.with_name("bench-open-loop.png").stat().st_size > 0
