"""What is published: the wheel and the sdist as an index would get them, and an API
reference that covers the public names.

scripts/test also builds both in an isolated environment and runs ``twine check`` on them;
here they are built with the installed hatchling (``--no-isolation``: no download) and
opened.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

import wsbroadcast

ROOT = Path(__file__).parent.parent
NOT_SHIPPED = ("tests/", "examples/", "bench/", "clients/", "scripts/", ".venv/")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and the wheel built from it, as `python -m build` makes them."""
    out = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--no-isolation", "--quiet"]
    result = subprocess.run(
        [*build, "--outdir", str(out), str(ROOT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"python -m build failed:\n{result.stdout}\n{result.stderr}"
    return out


def only(directory: Path, pattern: str) -> Path:
    (path,) = directory.glob(pattern)
    return path


def metadata(text: str) -> Message:
    return Parser().parsestr(text)


def test_wheel_holds_the_typed_package_and_nothing_else(dist: Path) -> None:
    wheel = only(dist, "wsbroadcast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    info = f"wsbroadcast-{wsbroadcast.__version__}.dist-info/"
    assert "wsbroadcast/py.typed" in names
    assert "wsbroadcast/__init__.py" in names
    assert f"{info}licenses/LICENSE" in names
    assert not [name for name in names if name.startswith(NOT_SHIPPED)]
    for name in names:
        assert name.startswith(("wsbroadcast/", info)), name
        assert "__pycache__" not in name, name


def test_wheel_metadata_has_one_version_and_no_development_extras(dist: Path) -> None:
    wheel = only(dist, "wsbroadcast-*.whl")
    info = f"wsbroadcast-{wsbroadcast.__version__}.dist-info/METADATA"
    fields = metadata(zipfile.ZipFile(wheel).read(info).decode())
    assert fields["Version"] == wsbroadcast.__version__
    assert fields["License-Expression"] == "MIT"
    extras = set(fields.get_all("Provides-Extra") or [])
    assert extras == {"starlette", "websockets", "redis", "client", "prometheus", "uvicorn", "app"}
    classifiers = set(fields.get_all("Classifier") or [])
    for framework in ("AsyncIO", "Trio", "AnyIO"):
        assert f"Framework :: {framework}" in classifiers
    assert "Typing :: Typed" in classifiers
    # PEP 639: the licence expression, not the deprecated licence classifiers.
    assert not [c for c in classifiers if c.startswith("License ::")]
    labels = {url.split(", ", 1)[0] for url in fields.get_all("Project-URL") or []}
    assert labels == {"Homepage", "Documentation", "Repository", "Changelog", "Issues"}
    # The long description is the README, whose links work away from the repository.
    assert fields["Description-Content-Type"] == "text/markdown"
    description = fields.get_payload()
    assert isinstance(description, str)
    assert description.startswith("# wsbroadcast")


def test_sdist_holds_what_building_and_reading_need(dist: Path) -> None:
    sdist = only(dist, "wsbroadcast-*.tar.gz")
    prefix = f"wsbroadcast-{wsbroadcast.__version__}/"
    with tarfile.open(sdist) as archive:
        names = {name.removeprefix(prefix) for name in archive.getnames()}
    for needed in ("PKG-INFO", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md"):
        assert needed in names
    assert "src/wsbroadcast/py.typed" in names
    assert not [name for name in names if name.startswith(NOT_SHIPPED)]


def test_api_reference_documents_every_public_name() -> None:
    """Each name of ``wsbroadcast.__all__`` has its entry in docs/reference/ (mkdocstrings
    directives; ``mkdocs build --strict`` fails on one that no longer resolves)."""
    directives = {
        match.group(1)
        for page in (ROOT / "docs" / "reference").glob("*.md")
        for match in re.finditer(r"^::: ([\w.]+)$", page.read_text(), re.MULTILINE)
    }
    missing = [name for name in wsbroadcast.__all__ if f"wsbroadcast.{name}" not in directives]
    assert not missing, f"add `::: wsbroadcast.NAME` to a page of docs/reference/: {missing}"
