"""The chat app's routes through Starlette's TestClient, and its pieces as units."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.types import Message, Scope
from starlette.websockets import WebSocket, WebSocketDisconnect

from examples.chat_app import Settings, create_app
from examples.chat_app import service as service_module
from examples.chat_app.__main__ import parse_args
from examples.chat_app.app import (
    ClientError,
    ErrorCode,
    RateLimiter,
    _StarletteSocket,
    origin_allowed,
    parse_client_frame,
    valid_name,
)
from examples.chat_app.edge import (
    ERROR_CODES,
    Command,
    Direct,
    Join,
    Leave,
    Say,
    _LocalBuckets,
    parse_command,
)
from examples.chat_app.responses import CLIENT_JS, _inline_hashes
from examples.chat_app.service import (
    CHAT_HTML,
    CLOSE_WAIT,
    ChatRequest,
    ChatService,
    _OutageLog,
)
from tests.chat_app.frames import is_personal_ack
from wsbroadcast import NAME_PATTERN, BackendUnavailable, ConnectionManager, History
from wsbroadcast.backends.memory import MemoryBackend
from wsbroadcast.envelope import EPOCH_PATTERN
from wsbroadcast.testing import MemoryTransport
from wsbroadcast.transports.base import FRAMES_EXTENSION
from wsbroadcast.transports.starlette import StarletteFramesTransport, StarletteTransport


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(Settings(max_text=10, max_message_bytes=200, rate_limit=0))
    with TestClient(app) as client:  # runs the lifespan, hence the manager
        yield client


def test_index_serves_chat_html_with_a_strict_csp(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert re.search(r"script-src 'self' 'sha256-[A-Za-z0-9+/=]{44}';", csp)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in response.text
    assert "//cdn" not in response.text
    assert '<script src="' not in response.text


def test_the_pages_csp_hashes_its_inline_module_script_and_allows_the_client(
    client: TestClient,
) -> None:
    """chat.html's code is one inline ``<script type="module">`` (hashed in the CSP) that
    imports ``/wsbroadcast-client.js`` (allowed by ``'self'``): no other script source."""
    html = CHAT_HTML.read_text(encoding="utf-8")
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.DOTALL)
    assert [attributes for attributes, _ in scripts] == [' type="module"']
    body = scripts[0][1]
    assert re.search(r'^import \{[^}]+\} from "/wsbroadcast-client\.js";$', body, re.M)
    assert "new WebSocket" not in body
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    csp = client.get("/").headers["content-security-policy"]
    style = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
    style_digest = base64.b64encode(hashlib.sha256(style[0].encode()).digest()).decode()
    assert f"script-src 'self' 'sha256-{digest}';" in csp
    assert f"style-src 'sha256-{style_digest}';" in csp


def test_the_js_client_is_served_from_its_one_source(client: TestClient) -> None:
    script = client.get("/wsbroadcast-client.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["x-content-type-options"] == "nosniff"
    assert script.content == CLIENT_JS.read_bytes()
    assert CLIENT_JS.parts[-4:] == ("clients", "js", "src", "wsbroadcast-client.js")


def test_inline_hashes_skip_external_scripts() -> None:
    html = '<script src="/a.js"></script><script type="module">x</script><script>y</script>'
    assert _inline_hashes(html, "script") == [
        "'sha256-LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE='",
        "'sha256-ofzkNjhU/4iM/0uOeHXWAMJoI5BBKoz3mzfQsRFIsPo='",
    ]


def test_healthz_and_metrics(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["connections"] == 0
    metrics = client.get("/metrics").text
    for line in metrics.splitlines():
        assert re.fullmatch(r"# (HELP|TYPE) \w+ .+|\w+(\{\w+=\"\w+\"\})? \d+", line), line
    assert "chat_up 1" in metrics


def test_routes_refuse_wrong_methods_and_bad_rooms(client: TestClient) -> None:
    assert client.post("/").status_code == 405
    assert client.get("/rooms/" + "r" * 65).status_code == 400
    assert client.get("/nowhere").status_code == 404


def receive(ws: WebSocketTestSession) -> Any:
    """The next frame, past the personal stream's ``joined`` (see tests/chat_app/frames.py)."""
    while is_personal_ack(frame := ws.receive_json()):
        pass
    return frame


def test_websocket_round_trip_and_room_view(client: TestClient) -> None:
    with client.websocket_connect("/ws/alice?room=units") as alice:
        join = receive(alice)
        assert (join["type"], join["client_id"], join["seq"]) == ("join", "alice", 1)
        assert client.get("/rooms/units").json() == {"room": "units", "online": ["alice"], "seq": 1}
        alice.send_text(json.dumps({"message": "hi"}))
        message = receive(alice)
        assert (message["seq"], message["data"]) == (2, {"message": "hi"})
        alice.send_text("{")
        assert receive(alice)["data"]["code"] == "invalid_json"
        alice.send_bytes(b"{}")
        assert receive(alice)["data"]["code"] == "binary_frame"
        alice.send_text(json.dumps({"message": "x" * 11}))
        assert receive(alice)["data"]["code"] == "message_too_long"
        metrics = client.get("/metrics").text
        assert 'chat_errors_total{code="invalid_json"} 1' in metrics
        assert "chat_messages_published_total 1" in metrics
        assert "chat_connections 1" in metrics
    assert client.get("/rooms/units").json() == {"room": "units", "online": [], "seq": 3}


def test_a_frame_over_max_message_bytes_closes_with_1009(client: TestClient) -> None:
    with client.websocket_connect("/ws/big") as ws:
        receive(ws)
        ws.send_text(json.dumps({"message": "é" * 100}))  # 100 characters, 200+ bytes
        with pytest.raises(WebSocketDisconnect) as closed:
            receive(ws)
        assert closed.value.code == 1009


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/ws/bad%20id", {}),
        ("/ws/ok?room=a+b", {}),
        ("/ws/ok?since=x", {}),
        ("/ws/ok", {"origin": "http://evil.example"}),
    ],
)
def test_refused_before_accept(client: TestClient, path: str, headers: dict[str, str]) -> None:
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect(path, headers=headers),
    ):
        pass
    assert refused.value.code == 1008


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"message": "hi"}', "hi"),
        ('{"message": "  padded  ", "client_id": "x", "seq": 3}', "  padded  "),
        ('{"message": "0123456789"}', "0123456789"),
        ("nope", ErrorCode.INVALID_JSON),
        ("NaN", ErrorCode.NOT_AN_OBJECT),
        ("[" * 5000, ErrorCode.INVALID_JSON),
        ("[" * 3000 + "]" * 3000, ErrorCode.INVALID_JSON),
        ("[]", ErrorCode.NOT_AN_OBJECT),
        ("null", ErrorCode.NOT_AN_OBJECT),
        ('{"msg": "hi"}', ErrorCode.MISSING_MESSAGE),
        ('{"message": true}', ErrorCode.MESSAGE_NOT_A_STRING),
        ('{"message": ""}', ErrorCode.EMPTY_MESSAGE),
        ('{"message": "\\t"}', ErrorCode.EMPTY_MESSAGE),
        ('{"message": "01234567890"}', ErrorCode.MESSAGE_TOO_LONG),
    ],
)
def test_parse_client_frame(text: str, expected: str) -> None:
    result = parse_client_frame(text, max_text=10)
    if isinstance(result, ClientError):
        assert result.code == expected
        assert result.detail
    else:
        assert result == expected


def test_rate_limiter_allows_bursts_of_twice_the_rate_then_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(5, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(11)] == [True] * 10 + [False]
    now[0] += 0.2  # one token back
    assert [limiter.allow(), limiter.allow()] == [True, False]
    now[0] += 100  # never more than the burst
    assert sum(limiter.allow() for _ in range(20)) == 10


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("http://chat.test:8000", True),
        ("HTTP://Chat.Test:8000/", True),
        ("https://chat.test:8000", False),
        ("http://chat.test:8001", False),
        ("http://chat.test", False),
        ("http://evil.test", False),
        ("http://chat.test:8000.evil.test", False),
        ("null", False),
        ("", False),
        ("https://trusted.test", True),
        ("https://trusted.test:443", True),
        ("http://trusted.test", False),
    ],
)
def test_origin_allowed(origin: str | None, allowed: bool) -> None:
    assert origin_allowed(origin, "chat.test:8000", False, ("https://trusted.test",)) is allowed


def test_valid_name() -> None:
    assert valid_name("a")
    assert valid_name("A-z_0.9" * 9 + "x")
    for good in ("chat:lobby", "user#42", "orders.eu-1", "alice@example.com"):
        assert valid_name(good), good
    for bad in ("", "x" * 65, "a b", "a/b", "é", "a\n", "a+b", "a{b}", "a%3A"):
        assert not valid_name(bad), bad


def test_chat_html_checks_names_with_the_library_pattern() -> None:
    """chat.html cannot import NAME_PATTERN: its copy must say the same, and every URL it
    builds must percent-encode the names (``#`` would start the fragment): the path's client
    id and ``/rooms/`` its own, the query (``room`` and the rest) by the JS client's
    ``URLSearchParams`` (test_chat_browser checks the URLs a real page opens)."""
    html = CHAT_HTML.read_text()
    assert f"const NAME = /^{NAME_PATTERN.pattern}$/;" in html
    assert '"/ws/" + encodeURIComponent(clientId)' in html
    assert '"/rooms/" + encodeURIComponent(name)' in html
    assert 'put("room", first.room)' in CLIENT_JS.read_text()
    assert "url.searchParams.set(key, String(value))" in CLIENT_JS.read_text()


def test_settings_and_command_line() -> None:
    assert Settings(history=50).backend_url() == "memory://?history=50"
    assert Settings(backend="memory://?history=9", history=5).backend_url() == "memory://?history=5"
    assert Settings().backend_url() == "memory://"
    for bad in ({"max_text": 0}, {"rate_limit": -1}, {"allowed_origins": ("evil",)}):
        kwargs: Any = bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(**kwargs)
    args = parse_args(["--rate-limit", "0", "--allowed-origin", "https://a.test"] * 1)
    assert (args.rate_limit, args.allowed_origins, args.port) == (0, ["https://a.test"], 8000)
    assert (args.server, args.ws) == ("uvicorn", "wsbroadcast")
    assert parse_args(["--ws", "websockets-sansio"]).ws == "websockets-sansio"
    assert parse_args(["--server", "websockets"]).server == "websockets"
    assert parse_args(
        ["--allowed-origin", "https://a", "--allowed-origin", "https://b"]
    ).allowed_origins == [
        "https://a",
        "https://b",
    ]
    for bad_args in (["--max-text", "0"], ["--server", "hypercorn"], ["--ws", "wsproto"]):
        with pytest.raises(SystemExit):
            parse_args(bad_args)


def test_the_module_level_app_is_importable() -> None:
    from examples.chat_app.app import app

    with TestClient(app) as client:
        assert client.get("/healthz").json()["status"] == "ok"


@pytest.mark.parametrize(
    "argv",
    [["--backend", "nope://"], ["--backend", "memory://?color=red"], ["--allowed-origin", "x"]],
)
def test_the_command_line_refuses_bad_settings_before_serving(argv: list[str]) -> None:
    from examples.chat_app.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert "error" in str(exited.value.code)


def test_history_reaches_the_redis_backend_and_the_log_hides_passwords() -> None:
    from examples.chat_app.service import _redact
    from wsbroadcast import backend_from_url
    from wsbroadcast.backends.redis import RedisBackend

    settings = Settings(backend="redis://:s3cret@127.0.0.1:6390/2?prefix=chat%3A", history=7)
    backend = backend_from_url(settings.backend_url())
    assert isinstance(backend, RedisBackend)
    assert (backend.history_size, backend.prefix) == (7, "chat:")
    assert backend.url == "redis://:s3cret@127.0.0.1:6390/2"
    assert (
        _redact(settings.backend_url()) == "redis://:***@127.0.0.1:6390/2?prefix=chat%3A&history=7"
    )
    assert _redact("redis://u:p@h:1/0") == "redis://u:***@h:1/0"
    assert _redact("memory://?history=5") == "memory://?history=5"


def test_the_starlette_front_end_takes_the_fast_path_when_the_server_offers_it() -> None:
    async def receive() -> Message:
        raise AssertionError("not called")

    async def send(message: Message) -> None:
        raise AssertionError("not called")

    async def drain() -> None:
        raise AssertionError("not called")

    extension = {"write": lambda data: True, "drain": drain, "abort": lambda: None}
    plain: Scope = {"type": "websocket", "path": "/ws/a", "headers": [], "extensions": {}}
    offered: Scope = {**plain, "extensions": {FRAMES_EXTENSION: extension}}
    assert type(_StarletteSocket(WebSocket(plain, receive, send)).transport) is StarletteTransport
    fast = _StarletteSocket(WebSocket(offered, receive, send)).transport
    assert isinstance(fast, StarletteFramesTransport)
    assert fast.close_timeout == CLOSE_WAIT


def test_edge_settings_and_flags() -> None:
    """The edge's flags: defaults, the per-IP rate following --rate-limit, bad values."""
    args = parse_args([])
    assert (args.max_connections_per_ip, args.handshake_timeout, args.shutdown_timeout) == (
        256, 10.0, 10
    )  # fmt: skip
    assert (args.ip_rate_limit, args.max_write_buffer) == (None, 4 * 1024 * 1024)
    assert Settings(rate_limit=20).effective_ip_rate_limit == 100
    assert Settings(rate_limit=0).effective_ip_rate_limit == 0
    assert Settings(rate_limit=0, ip_rate_limit=7).effective_ip_rate_limit == 7
    for bad in (
        {"ip_rate_limit": -1},
        {"max_connections_per_ip": -1},
        {"handshake_timeout": 0},
        {"max_write_buffer": 0},
        {"shutdown_timeout": 0},
    ):
        kwargs: Any = bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(**kwargs)
    assert (args.max_rooms, Settings().max_rooms) == (32, 32)
    assert parse_args(["--max-rooms", "2"]).max_rooms == 2
    assert args.slow_consumer == "disconnect"
    assert parse_args(["--slow-consumer", "drop_oldest"]).slow_consumer == "drop_oldest"
    with pytest.raises(ValueError, match="max_rooms"):
        Settings(max_rooms=0)
    for argv in (
        ["--handshake-timeout", "0"],
        ["--max-connections-per-ip", "-1"],
        ["--max-rooms", "0"],
        ["--slow-consumer", "drop-newest"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_local_buckets_limit_per_key_and_forget_the_least_recently_used() -> None:
    """The fallback while the backend cannot answer ``allow``: per key, bounded in number."""
    buckets = _LocalBuckets(max_buckets=2)
    assert [buckets.allow("a", 1) for _ in range(3)] == [True, True, False]  # burst of 2
    assert buckets.allow("b", 1)
    assert buckets.allow("c", 1)  # "a" is forgotten: three keys, room for two
    assert buckets.allow("a", 1)  # a full bucket again


def test_outage_log_warns_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    outage = _OutageLog()
    caplog.set_level(logging.DEBUG, logger="examples.chat_app")
    for n in range(5):
        outage.failed(f"send {n}", ConnectionError("down"))
    outage.worked()
    outage.worked()
    outage.failed("again", ConnectionError("down"))
    levels = [(r.levelname, r.getMessage().split(" (")[0]) for r in caplog.records]
    assert levels == [
        ("WARNING", "backend unavailable"),
        *[("DEBUG", f"send {n}: down") for n in range(1, 5)],
        ("INFO", "backend available again"),
        ("WARNING", "backend unavailable"),
    ]


def test_metrics_values_stay_integers_and_have_no_created_series() -> None:
    """prometheus_client writes floats (3.0, 1.234567e+06); /metrics keeps whole numbers."""
    service = ChatService(Settings())
    service.counters.messages = 1234567
    service.counters.errors["rate_limited"] = 3
    response = service.metrics()
    assert response.content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = response.body.decode()
    assert re.search(r"^chat_messages_published_total 1234567$", text, re.MULTILINE)
    assert re.search(r'^chat_errors_total\{code="rate_limited"\} 3$', text, re.MULTILINE)
    assert re.search(r"^chat_up 0$", text, re.MULTILINE)
    assert "_created" not in text
    assert "# HELP chat_close_aborts_total Connections dropped" in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"message": "hi"}', Say(None, "hi")),
        ('{"message": "hi", "client_id": "x", "seq": 3}', Say(None, "hi")),
        ('{"room": "chat:b", "message": "hi"}', Say("chat:b", "hi")),
        ('{"join": "b"}', Join("b", None, None)),
        ('{"join": "b", "since": 0}', Join("b", 0, None)),
        ('{"join": "b", "since": 7, "epoch": "e-1_X"}', Join("b", 7, "e-1_X")),
        ('{"join": "b", "since": null, "epoch": null}', Join("b", None, None)),
        ('{"join": "b", "since": 999999999999999999}', Join("b", 10**18 - 1, None)),
        ('{"join": "@alice"}', Join("@alice", None, None)),
        ('{"leave": "b"}', Leave("b")),
        ('{"to": "bob", "message": "psst"}', Direct("bob", "psst")),
        ('{"to": "user#42", "message": " x "}', Direct("user#42", " x ")),
        # The first key of join, leave, to, message decides, whatever else the object holds.
        ('{"message": "hi", "join": "b"}', Join("b", None, None)),
        ('{"leave": "b", "join": "c"}', Join("c", None, None)),
        ('{"to": "bob", "leave": "b", "message": "x"}', Leave("b")),
        ('{"room": "b", "to": "bob", "message": "x"}', Direct("bob", "x")),
    ],
)
def test_parse_command_reads_each_kind_of_frame(text: str, expected: Command) -> None:
    assert parse_command(text, max_text=10) == expected


@pytest.mark.parametrize(
    ("text", "code", "room"),
    [
        ("nope", ErrorCode.INVALID_JSON, None),
        ("[" * 5000, ErrorCode.INVALID_JSON, None),
        ("[1]", ErrorCode.NOT_AN_OBJECT, None),
        ("{}", ErrorCode.MISSING_MESSAGE, None),
        ('{"room": "b"}', ErrorCode.MISSING_MESSAGE, "b"),
        ('{"room": "b", "message": 1}', ErrorCode.MESSAGE_NOT_A_STRING, "b"),
        ('{"room": "b", "message": " "}', ErrorCode.EMPTY_MESSAGE, "b"),
        ('{"room": "b", "message": "01234567890"}', ErrorCode.MESSAGE_TOO_LONG, "b"),
        ('{"room": "a b", "message": "hi"}', ErrorCode.INVALID_ROOM, None),
        ('{"room": null, "message": "hi"}', ErrorCode.INVALID_ROOM, None),
        ('{"room": 5, "message": "hi"}', ErrorCode.INVALID_ROOM, None),
        ('{"join": ""}', ErrorCode.INVALID_ROOM, None),
        ('{"join": null}', ErrorCode.INVALID_ROOM, None),
        ('{"join": ["b"]}', ErrorCode.INVALID_ROOM, None),
        ('{"join": "' + "r" * 65 + '"}', ErrorCode.INVALID_ROOM, None),
        ('{"join": "b", "since": -1}', ErrorCode.BAD_SINCE, "b"),
        ('{"join": "b", "since": 1.5}', ErrorCode.BAD_SINCE, "b"),
        ('{"join": "b", "since": 2.0}', ErrorCode.BAD_SINCE, "b"),
        ('{"join": "b", "since": "3"}', ErrorCode.BAD_SINCE, "b"),
        ('{"join": "b", "since": true}', ErrorCode.BAD_SINCE, "b"),
        ('{"join": "b", "since": 1000000000000000000}', ErrorCode.BAD_SINCE, "b"),
        ('{"join": "b", "since": 1, "epoch": ""}', ErrorCode.BAD_EPOCH, "b"),
        ('{"join": "b", "since": 1, "epoch": "a b"}', ErrorCode.BAD_EPOCH, "b"),
        ('{"join": "b", "epoch": 5}', ErrorCode.BAD_EPOCH, "b"),
        ('{"join": "b", "epoch": "' + "e" * 33 + '"}', ErrorCode.BAD_EPOCH, "b"),
        ('{"leave": "a/b"}', ErrorCode.INVALID_ROOM, None),
        ('{"leave": 1}', ErrorCode.INVALID_ROOM, None),
        ('{"to": "a b", "message": "hi"}', ErrorCode.INVALID_RECIPIENT, None),
        ('{"to": null, "message": "hi"}', ErrorCode.INVALID_RECIPIENT, None),
        ('{"to": "bob"}', ErrorCode.MISSING_MESSAGE, None),
        ('{"to": "bob", "message": ""}', ErrorCode.EMPTY_MESSAGE, None),
        ('{"to": "bob", "message": "01234567890"}', ErrorCode.MESSAGE_TOO_LONG, None),
    ],
)
def test_parse_command_refuses_with_a_code(text: str, code: str, room: str | None) -> None:
    result = parse_command(text, max_text=10)
    assert isinstance(result, ClientError), result
    assert (result.code, result.room) == (code, room)
    assert result.detail
    assert code in ERROR_CODES


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
COMMAND_KEYS = st.sampled_from(["join", "leave", "to", "room", "message", "since", "epoch"])
NAMES = st.from_regex(NAME_PATTERN, fullmatch=True)


@given(
    st.dictionaries(
        COMMAND_KEYS | st.text(max_size=8),
        JSON_VALUES | NAMES | st.integers(min_value=-1, max_value=2**63),
        max_size=6,
    )
)
def test_parse_command_never_raises_on_any_json_object(value: dict[str, Any]) -> None:
    """Any JSON object at all: a command whose fields are checked, or a ClientError with a
    known code; never an exception."""
    text = json.dumps(value, allow_nan=True)
    result = parse_command(text, max_text=10)
    if isinstance(result, ClientError):
        assert result.code in ERROR_CODES
        assert result.detail
        assert result.room is None or NAME_PATTERN.fullmatch(result.room)
        return
    if isinstance(result, Join):
        assert "join" in value
        assert NAME_PATTERN.fullmatch(result.room)
        assert result.since is None or 0 <= result.since < 10**18
        assert result.epoch is None or EPOCH_PATTERN.fullmatch(result.epoch)
    elif isinstance(result, Leave):
        assert "join" not in value
        assert NAME_PATTERN.fullmatch(result.room)
    elif isinstance(result, Direct):
        assert not {"join", "leave"} & set(value)
        assert NAME_PATTERN.fullmatch(result.to)
        assert result.text == value["message"]
        assert 0 < len(result.text) <= 10
    else:
        assert isinstance(result, Say)
        assert not {"join", "leave", "to"} & set(value)
        assert result.room == value.get("room")
        assert result.text == value["message"]
        assert result.text.strip()
        assert len(result.text) <= 10


@given(st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1")))
def test_parse_command_never_raises_on_any_text(text: str) -> None:
    result = parse_command(text, max_text=10)
    assert isinstance(result, Say | Join | Leave | Direct | ClientError)


class _PersonalOutage(MemoryBackend):
    """The memory backend, failing the first ``failures`` reads of a personal stream: a
    backend outage that begins between a connect and its personal stream's join."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def history(self, room: str, since: int, epoch: str | None = None) -> History:
        if room.startswith("@") and self.failures:
            self.failures -= 1
            raise BackendUnavailable("personal streams are down")
        return await super().history(room, since, epoch)


class _QueueSocket:
    """A :class:`ChatSocket` over a MemoryTransport, fed by the test."""

    gone: tuple[type[Exception], ...] = (ConnectionError,)

    def __init__(self) -> None:
        self.transport = MemoryTransport()
        self.send, self.frames = anyio.create_memory_object_stream[str | None](10)

    async def receive(self) -> str | bytes | None:
        return await self.frames.receive()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_personal_stream_the_backend_refused_is_joined_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection stays open, is told its direct messages are unavailable, goes on
    chatting, and gets its personal stream's joined once the backend answers again."""
    monkeypatch.setattr(service_module, "PERSONAL_RETRY_FIRST", 0.001)
    service = ChatService(Settings(rate_limit=0))
    socket = _QueueSocket()
    transport = socket.transport
    async with (
        socket.send,
        socket.frames,
        ConnectionManager(_PersonalOutage(failures=2)) as manager,
    ):
        service.manager = manager

        def seen(kind: str) -> Callable[[MemoryTransport], bool]:
            return lambda t: any(m["type"] == kind for m in t.messages())

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(service.serve, ChatRequest("alice", "outage", None), socket)
            with anyio.fail_after(10):
                await transport.wait_until(seen("error"))
                await socket.send.send(json.dumps({"message": "still chatting"}))
                await transport.wait_until(seen("joined"))
                await transport.wait_until(seen("message"))
                await socket.send.send(json.dumps({"to": "alice", "message": "note"}))
                await transport.wait_until(seen("direct"))
                await socket.send.send(None)  # the client leaves
    frames = transport.messages()
    error = next(m for m in frames if m["type"] == "error")
    assert (error["room"], error["data"]["code"]) == ("@alice", "unavailable")
    joined = next(m for m in frames if m["type"] == "joined")
    assert joined["room"] == "@alice"
    assert frames[-1]["room"] == "@alice"
    assert [m["data"] for m in frames if m["type"] == "message"] == [{"message": "still chatting"}]
