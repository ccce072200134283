"""The README's usage example runs as printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

README = Path(__file__).parent.parent / "README.md"


def test_readme_usage_example_broadcasts_with_sequence_numbers() -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    with (
        TestClient(namespace["app"]) as client,
        client.websocket_connect("/ws/alice") as alice,
    ):
        assert alice.receive_json()["type"] == "join"
        with client.websocket_connect("/ws/bob") as bob:
            assert bob.receive_json()["seq"] == 2
            alice.send_text("hello")
            for socket in (alice, bob):
                received = socket.receive_json()
                if received["type"] == "join":
                    received = socket.receive_json()
                assert received["data"] == {"message": "hello"}
                assert received["seq"] == 3
