"""chat.html in a real browser: Debian's headless Chromium driven by Playwright.

Never ``playwright install``: the browser is ``/usr/bin/chromium`` from the ``chromium`` package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, WebSocket, WebSocketRoute

    from tests.chat_app.servers import ChatServer, StartServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "chat.png"
TIMEOUT_MS = 15_000
CLIENT_MODULE = "/wsbroadcast-client.js"
RECORD_SOCKETS = """(() => {
  // Before the page's own scripts: remember who constructs each WebSocket, and its URL.
  const Original = window.WebSocket;
  const made = [];
  Object.defineProperty(window, "__chatSockets", { value: made });
  window.WebSocket = class extends Original {
    constructor(...args) {
      made.push({ url: String(args[0]), stack: String(new Error().stack) });
      super(...args);
    }
  };
})();"""

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@dataclass
class PageRecord:
    """What a page of :func:`open_chat` saw: console errors, WebSocket URLs, envelopes."""

    errors: list[str]
    urls: list[str]
    envelopes: list[dict[str, Any]]


RECORDS: weakref.WeakKeyDictionary[Page, PageRecord] = weakref.WeakKeyDictionary()


@pytest.fixture(scope="module")
def server(start_server: StartServer, server_kind: str) -> ChatServer:
    """The app on each ``--server``: the page works the same on both."""
    return start_server(kind=server_kind)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_chat(
    browser: Browser,
    server: ChatServer,
    client_id: str,
    room: str,
    route: Callable[[WebSocketRoute], None] | None = None,
) -> Page:
    page = browser.new_context(viewport={"width": 900, "height": 520}).new_page()
    if route is not None:
        page.route_web_socket(re.compile(r"/ws/"), route)
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "console",
        lambda message: errors.append(message.text) if message.type == "error" else None,
    )
    urls: list[str] = []
    envelopes: list[dict[str, Any]] = []

    def watch(ws: WebSocket) -> None:
        """Record the URL of each WebSocket the page opens and every envelope it receives."""
        urls.append(ws.url)

        def received(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if "seq" in frame:
                envelopes.append(frame)

        ws.on("framereceived", received)

    page.on("websocket", watch)
    page.add_init_script(RECORD_SOCKETS)
    RECORDS[page] = PageRecord(errors, urls, envelopes)
    page.goto(f"{server.url}/?client_id={client_id}&room={room}")
    wait_online(page)
    return page


def wait_online(page: Page) -> None:
    page.wait_for_selector('#status[data-state="online"]')


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def wait_for_line(page: Page, kind: str, text: str) -> None:
    """Wait until a line of class ``kind`` in #messages has exactly this text."""
    page.wait_for_function(
        """([kind, text]) => Array.from(document.querySelectorAll("#messages > li." + kind))
            .some((li) => li.querySelector(".text").textContent === text)""",
        arg=[kind, text],
    )


def lines(page: Page) -> list[str]:
    texts: list[str] = page.eval_on_selector_all(
        "#messages > li",
        "items => items.map((li) => li.className + ': ' + li.querySelector('.text').textContent)",
    )
    return texts


def sockets_made(page: Page) -> list[dict[str, str]]:
    """Every WebSocket the page constructed: its URL and the stack that constructed it."""
    made: list[dict[str, str]] = page.evaluate("() => window.__chatSockets")
    return made


def assert_runs_on_the_js_client(page: Page, server: ChatServer) -> None:
    """The page's one script is a module importing the JS client, served by the app; it
    builds no WebSocket itself: every one the page made was constructed by the client."""
    scripts = page.eval_on_selector_all(
        "script", "items => items.map((s) => [s.type, s.src, s.textContent])"
    )
    assert len(scripts) == 1, scripts
    kind, src, text = scripts[0]
    assert (kind, src) == ("module", "")
    assert re.search(rf'^import {{ WsBroadcastClient }} from "{CLIENT_MODULE}";$', text, re.M)
    assert "WebSocket(" not in text
    assert "readyState" not in text
    loaded = page.evaluate("() => performance.getEntriesByType('resource').map((e) => e.name)")
    assert f"{server.url}{CLIENT_MODULE}" in loaded, loaded
    made = sockets_made(page)
    assert made
    for socket in made:
        assert f"{server.url}{CLIENT_MODULE}:" in socket["stack"], socket["stack"]
        # the page's own code is on the stack only as the caller of the client's connect()
        frames = [line for line in socket["stack"].splitlines() if "    at " in line]
        assert CLIENT_MODULE in frames[1], frames  # [0] is the recorder


def test_two_pages_chat_safely_and_survive_a_restart(browser: Browser, server: ChatServer) -> None:
    room = "browser"
    alice = open_chat(browser, server, "alice", room)
    bob = open_chat(browser, server, "bob", room)
    wait_for_line(alice, "join", "bob joined")
    alice.wait_for_function("() => document.querySelector('#online').textContent.includes('bob')")

    # Enter sends and clears the box; both pages show the message with its sender.
    say(alice, "Hello Bob!")
    assert alice.input_value("#message") == ""
    wait_for_line(bob, "message", "Hello Bob!")
    wait_for_line(alice, "message", "Hello Bob!")
    sender = bob.locator("#messages > li.message .sender").last
    assert sender.text_content() == "alice"
    time = bob.locator("#messages > li.message .time").last.text_content()
    assert time is not None
    assert len(time) >= 5

    # Markup typed by one is literal text for the other, never parsed.
    markup = '<img src=x onerror="window.pwned=1"><b>bold</b><script>window.pwned=2</script>'
    say(bob, markup)
    wait_for_line(alice, "message", markup)
    assert alice.locator("#messages img, #messages b, #messages script").count() == 0
    assert alice.evaluate("() => window.pwned") is None

    # Errors from the server are shown.
    say(bob, "x" * 4001)
    bob.wait_for_selector("#messages > li.error")
    assert "message_too_long" in bob.locator("#messages > li.error").last.inner_text()

    # The README's screenshot: refreshed when missing or when UPDATE_SCREENSHOT is set, so
    # that a test run does not leave the checkout modified.
    png = alice.screenshot()
    assert png.startswith(b"\x89PNG")
    if not SCREENSHOT.exists() or os.environ.get("UPDATE_SCREENSHOT"):
        SCREENSHOT.write_bytes(png)

    # A server restart (memory://: every stream starts again under a new epoch): both
    # reconnect by themselves, resuming with the (epoch, seq) of the last envelope they
    # showed; the server answers history_lost, which the page shows once, then chats on.
    last = {page: RECORDS[page].envelopes[-1] for page in (alice, bob)}
    server.restart()
    wait_online(alice)
    wait_online(bob)
    notice = "Some earlier messages could not be recovered."
    wait_for_line(alice, "notice", notice)
    wait_for_line(bob, "notice", notice)
    say(bob, "after the restart")
    wait_for_line(alice, "message", "after the restart")
    wait_for_line(bob, "message", "after the restart")
    for page in (alice, bob):
        shown = lines(page)
        # Nothing shown twice: every message line from before the restart appears once.
        assert shown.count("message: Hello Bob!") == 1
        assert shown.count("message: after the restart") == 1
        # One notice, no reconnect loop: the page stayed on the connection that got it.
        assert shown.count(f"notice: {notice}") == 1
        assert page.get_attribute("#status", "data-state") == "online"
        urls = RECORDS[page].urls
        resumed = [url for url in urls if "since=" in url]
        assert resumed, urls
        assert f"since={last[page]['seq']}&epoch={last[page]['epoch']}" in resumed[0], resumed

    # A closed page shows up as a leave for the other.
    bob.context.close()
    wait_for_line(alice, "leave", "bob left")
    alice.wait_for_function("() => !document.querySelector('#online').textContent.includes('bob')")
    assert [e for e in RECORDS[alice].errors if "WebSocket" not in e] == []
    alice.context.close()


def test_resume_after_a_dropped_connection_misses_nothing(
    browser: Browser, server: ChatServer
) -> None:
    """Carol's socket is cut (the server stays up): she resumes from her last seq."""
    room = "resume-browser"
    sockets: list[WebSocketRoute] = []
    away = False

    def route(ws: WebSocketRoute) -> None:
        """Proxy the page's WebSocket to the server, or refuse it while carol is away."""
        if away:
            ws.close(code=1001)
            return
        ws.connect_to_server()
        sockets.append(ws)

    carol = open_chat(browser, server, "carol", room, route=route)
    dave = open_chat(browser, server, "dave", room)
    wait_for_line(carol, "join", "dave joined")
    say(dave, "before the drop")
    wait_for_line(carol, "message", "before the drop")

    away = True
    sockets[-1].close(code=4000, reason="cut by the test")
    carol.wait_for_selector('#status[data-state="offline"]')
    for n in range(3):
        say(dave, f"while away {n}")
    wait_for_line(dave, "message", "while away 2")
    away = False
    wait_for_line(carol, "message", "while away 2")
    say(dave, "after the return")
    wait_for_line(carol, "message", "after the return")
    messages = [line for line in lines(carol) if line.startswith("message: ")]
    assert messages == [
        "message: before the drop",
        "message: while away 0",
        "message: while away 1",
        "message: while away 2",
        "message: after the return",
    ]
    carol.context.close()
    dave.context.close()


def test_namespaced_names_are_encoded_in_urls(browser: Browser, server: ChatServer) -> None:
    """``user#42`` in ``chat:lobby``: the page percent-encodes both in the WebSocket URL and
    in ``/rooms/{room}`` (an unescaped ``#`` would start the fragment), and chats."""
    user = open_chat(browser, server, "user%2342", "chat%3Alobby")
    alice = open_chat(browser, server, "alice%40example.com", "chat%3Alobby")
    assert user.text_content("#me") == "user#42"
    assert user.text_content("#room") == "chat:lobby"
    url = RECORDS[user].urls[0]
    assert url.endswith("/ws/user%2342?room=chat%3Alobby"), url
    user.wait_for_function(
        "() => document.querySelector('#online').textContent.includes('alice@example.com')"
    )
    say(user, "hi from #42")
    wait_for_line(alice, "message", "hi from #42")
    assert alice.locator("#messages > li.message .sender").last.text_content() == "user#42"
    assert RECORDS[user].errors == []
    for page in (user, alice):
        page.context.close()


def test_msg_shows_in_the_direct_messages_of_both(browser: Browser, server: ChatServer) -> None:
    """``/msg bob hi``: bob's page counts it unread and shows "alice → bob: hi" in its direct
    messages; alice's page shows her own copy there, not counted unread; a bad /msg is
    answered on the page, not sent."""
    alice = open_chat(browser, server, "msg-alice", "msg-room")
    bob = open_chat(browser, server, "msg-bob", "msg-room")
    say(alice, "/msg msg-bob hi")
    assert alice.input_value("#message") == ""
    wait_unread(bob, "@msg-bob", 1)
    open_room(bob, "@msg-bob")
    wait_unread(bob, "@msg-bob", 0)
    wait_for_line(bob, "direct", "msg-alice → msg-bob: hi")
    assert bob.text_content("#room") == "direct messages"
    say(bob, "/msg msg-alice hello yourself")  # from the direct messages' view
    wait_for_line(bob, "direct", "msg-alice → msg-bob: hi")
    wait_unread(alice, "@msg-alice", 1)  # bob's; her own was not counted
    open_room(alice, "@msg-alice")
    wait_for_line(alice, "direct", "msg-bob → msg-alice: hello yourself")
    assert lines(alice) == [
        "direct: msg-alice → msg-bob: hi",
        "direct: msg-bob → msg-alice: hello yourself",
    ]
    say(alice, "plain text")  # not a /msg: nowhere to go from this view
    wait_for_line(alice, "error", "To send a direct message: /msg <client id> <message>")
    say(alice, "/msg bad/name hi")
    say(alice, "/msg msg-bob")
    assert [line.split(":")[0] for line in lines(alice)].count("error") == 3
    assert lines(alice)[-1] == "error: Usage: /msg <client id> <message>"
    for page in (alice, bob):
        assert RECORDS[page].errors == []
        page.context.close()


def join_room(page: Page, room: str) -> None:
    """Join ``room`` with the room list's form; wait until the server said joined."""
    page.fill("#join-room", room)
    page.click("#join-button")
    wait_joined(page, room)


def wait_joined(page: Page, room: str) -> None:
    page.wait_for_selector(f'#rooms li[data-room="{room}"]:not(.joining)')


def open_room(page: Page, room: str) -> None:
    """Show ``room`` (its lines in #messages)."""
    page.click(f'#rooms li[data-room="{room}"] .open')
    page.wait_for_selector(f'#rooms li.current[data-room="{room}"]')


def unread_selector(room: str, count: int) -> str:
    return f'#rooms li[data-room="{room}"] .unread[data-count="{count}"]'


def wait_unread(page: Page, room: str, count: int) -> None:
    """Wait until ``room``'s unread count is ``count`` (an empty badge is hidden)."""
    page.wait_for_selector(unread_selector(room, count), state="attached")


def unread(page: Page, room: str) -> int:
    count = page.get_attribute(f'#rooms li[data-room="{room}"] .unread', "data-count")
    assert count is not None
    return int(count)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A redis-server for the page's server: its streams outlive a restart of the server."""
    from tests.backends.redis.redis_helpers import RedisServer

    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail("redis-server is not installed (scripts/test installs it)")
    redis = RedisServer(executable)
    redis.start()
    try:
        yield redis.url
    finally:
        redis.kill()


def test_rooms_direct_messages_and_unread_counts_survive_a_restart(
    browser: Browser, start_server: StartServer, server_kind: str, redis_url: str
) -> None:
    """alice is in two rooms and her direct messages; the server restarts (on Redis, so
    history outlives it) and bob publishes in both rooms and to her while she is still away:
    back, she shows each of those once, in its room, with unread counts where she is not."""
    server = start_server("--backend", redis_url, kind=server_kind)
    home, second = f"br-a-{server_kind}", f"br-b-{server_kind}"
    sockets: list[WebSocketRoute] = []
    away = False

    def route(ws: WebSocketRoute) -> None:
        """Proxy alice's WebSocket to the server, or refuse it while she is away."""
        if away:
            ws.close(code=1001)
            return
        ws.connect_to_server()
        sockets.append(ws)

    alice = open_chat(browser, server, "alice", home, route=route)
    bob = open_chat(browser, server, "bob", home)
    join_room(alice, second)  # joining shows the room
    assert alice.text_content("#room") == second
    join_room(bob, second)
    say(alice, "b before")
    wait_for_line(bob, "message", "b before")
    open_room(bob, home)
    say(bob, "a before")
    wait_for_line(bob, "message", "a before")
    wait_unread(alice, home, 1)  # alice shows the second room: the first counts unread

    say(alice, "/msg bob hi")
    wait_unread(bob, "@bob", 1)
    open_room(bob, "@bob")
    wait_for_line(bob, "direct", "alice → bob: hi")

    away = True
    server.restart()
    alice.wait_for_selector('#status[data-state="offline"]')
    wait_online(bob)
    wait_joined(bob, second)
    open_room(bob, home)
    say(bob, "a while away")
    wait_for_line(bob, "message", "a while away")
    open_room(bob, second)
    say(bob, "b while away")
    wait_for_line(bob, "message", "b while away")
    say(bob, "/msg alice are you there?")
    away = False

    wait_online(alice)
    wait_for_line(alice, "message", "b while away")  # the room shown
    say(bob, "b after")
    wait_for_line(alice, "message", "b after")
    # Everything replayed came before: unread are bob's two in the first room and his
    # direct message (alice's own is not counted).
    assert (unread(alice, home), unread(alice, "@alice"), unread(alice, second)) == (2, 1, 0)
    assert [line for line in lines(alice) if line.startswith("message: ")] == [
        "message: b before",
        "message: b while away",
        "message: b after",
    ]
    open_room(alice, home)
    wait_unread(alice, home, 0)
    assert [line for line in lines(alice) if line.startswith("message: ")] == [
        "message: a before",
        "message: a while away",
    ]
    open_room(alice, "@alice")
    wait_unread(alice, "@alice", 0)
    assert lines(alice) == ["direct: alice → bob: hi", "direct: bob → alice: are you there?"]
    # Every room resumed: no history was lost, so no notice anywhere.
    for room in (home, second):
        open_room(alice, room)
        assert not [line for line in lines(alice) if line.startswith("notice: ")], lines(alice)
    assert len(sockets) >= 2  # she did reconnect
    # ... by the JS client, which put the home room's and the personal stream's positions in
    # the URL (the second room is resumed by a join frame).
    for page in (alice, bob):
        assert_runs_on_the_js_client(page, server)
    last_url = sockets_made(alice)[-1]["url"]
    for key in ("room", "since", "epoch", "dm_since", "dm_epoch"):
        assert f"{key}=" in last_url, last_url
    for page in (alice, bob):
        assert [e for e in RECORDS[page].errors if "WebSocket" not in e] == []
        page.context.close()
    assert "Traceback" not in server.stderr()
