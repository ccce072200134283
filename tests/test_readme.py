"""The README's examples run as printed, and the README renders on a package index."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient, WebSocketTestSession

README = Path(__file__).parent.parent / "README.md"
REPOSITORY = "https://github.com/wsbroadcast/wsbroadcast"
RAW = "https://raw.githubusercontent.com/wsbroadcast/wsbroadcast/main/"


def python_block(path: Path, marker: str) -> str:
    """The one Python block of ``path`` that contains ``marker``."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", path.read_text(), re.DOTALL)
    (code,) = [block for block in blocks if marker in block]
    return code


def readme_app(marker: str) -> Any:
    """The ASGI app defined by the README's Python block that contains ``marker``."""
    code = python_block(README, marker)
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace["app"]


def bob_joins_and_alice_says_hello(alice: WebSocketTestSession, bob: WebSocketTestSession) -> None:
    """Bob's join is seq 2; alice's hello reaches both as seq 3, after bob's join for alice."""
    assert bob.receive_json()["seq"] == 2
    alice.send_text("hello")
    for socket in (alice, bob):
        received = socket.receive_json()
        if received["type"] == "join":
            received = socket.receive_json()
        assert (received["data"], received["seq"]) == ({"message": "hello"}, 3)


def test_readme_opens_with_pip_install_and_the_fastapi_example() -> None:
    text = README.read_text()
    first_command = re.search(r"```sh\n(.*?)\n", text)
    assert first_command is not None
    assert first_command.group(1).startswith("pip install wsbroadcast ")
    first_python = text.index("```python")
    assert text.index("## With FastAPI") < first_python
    assert "from fastapi import" in text[first_python : text.index("```", first_python + 3)]


def test_docs_site_opens_with_the_readme_fastapi_example() -> None:
    docs_index = README.parent / "docs" / "index.md"
    marker = "from fastapi import"
    assert python_block(docs_index, marker) == python_block(README, marker)


def test_readme_fastapi_example_broadcasts_resumes_and_publishes_over_http() -> None:
    with (
        TestClient(readme_app("from fastapi import")) as client,
        client.websocket_connect("/ws/lobby/alice") as alice,
    ):
        join = alice.receive_json()
        assert (join["type"], join["seq"]) == ("join", 1)
        with client.websocket_connect("/ws/lobby/bob") as bob:
            bob_joins_and_alice_says_hello(alice, bob)
            response = client.post("/rooms/lobby/messages", json={"message": "from HTTP"})
            assert response.status_code == 202
            assert response.json() == {"seq": 4, "epoch": join["epoch"]}
            for socket in (alice, bob):
                received = socket.receive_json()
                assert received["data"] == {"message": "from HTTP"}
                assert (received["seq"], received["client_id"]) == (4, None)
            # A second tab of alice's resumes after seq 2: exactly what it missed, in order.
            url = f"/ws/lobby/alice?since=2&epoch={join['epoch']}"
            with client.websocket_connect(url) as second_tab:
                resumed = [second_tab.receive_json() for _ in range(2)]
                assert [(e["seq"], e["data"]) for e in resumed] == [
                    (3, {"message": "hello"}),
                    (4, {"message": "from HTTP"}),
                ]


def test_readme_starlette_example_broadcasts_with_sequence_numbers() -> None:
    with (
        TestClient(readme_app("from starlette.applications import")) as client,
        client.websocket_connect("/ws/alice") as alice,
    ):
        assert alice.receive_json()["type"] == "join"
        with client.websocket_connect("/ws/bob") as bob:
            bob_joins_and_alice_says_hello(alice, bob)


def test_readme_keeps_the_two_set_up_commands() -> None:
    text = README.read_text()
    set_up = text[text.index("## Set up") :]
    block = re.search(r"```sh\n(.*?)```", set_up, re.DOTALL)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["scripts/chat", "scripts/test"]


def test_readme_links_and_images_are_absolute() -> None:
    """A package index renders the README away from the repository: a relative link or
    image there is broken, and so is a link to a heading."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
    assert targets
    for target in targets:
        assert target.startswith(("https://", "http://")), target
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert images
    for image in images:
        assert image.startswith(RAW), image
    # And each points at something the repository has.
    checkout = README.parent
    for target in targets:
        path = target.split("#")[0]
        if path.startswith(REPOSITORY + "/blob/main/"):
            assert (checkout / path.removeprefix(REPOSITORY + "/blob/main/")).is_file(), target
        elif path.startswith(REPOSITORY + "/tree/main/"):
            assert (checkout / path.removeprefix(REPOSITORY + "/tree/main/")).is_dir(), target
        elif path.startswith(RAW):
            assert (checkout / path.removeprefix(RAW)).is_file(), target


def test_readme_gc_pauses_snippet_runs_in_the_starlette_examples_lifespan() -> None:
    from starlette.applications import Starlette

    from wsbroadcast import GCPauses

    namespace: dict[str, Any] = {}
    for marker in ("from starlette.applications import", "from wsbroadcast import GCPauses"):
        exec(compile(python_block(README, marker), "README.md", "exec"), namespace)
    app = Starlette(routes=namespace["app"].routes, lifespan=namespace["lifespan"])
    with TestClient(app) as client, client.websocket_connect("/ws/alice") as alice:
        assert alice.receive_json()["type"] == "join"
        assert GCPauses.current() is not None
    assert GCPauses.current() is None
