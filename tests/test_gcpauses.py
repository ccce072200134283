"""GCPauses (wsbroadcast.gcpauses): full collections measured, their survivors frozen, the
permanent generation thawed once it has grown, and the collector left as it was found."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from wsbroadcast.gcpauses import GCPauses

pytestmark = pytest.mark.anyio


class Node:
    """An object that can be put in a reference cycle (and weakly referred to)."""

    other: Node | None = None


@pytest.fixture(autouse=True)
def _collector_as_found() -> Iterator[None]:
    """Only the tests' own collections run (an automatic one would shift the counts), and
    whatever a test does, the process's collector is left unfrozen and uninstalled."""
    enabled = gc.isenabled()
    gc.disable()
    yield
    installed = GCPauses.current()
    if installed is not None:
        installed.uninstall()
    gc.unfreeze()
    if enabled:
        gc.enable()


async def frozen_after(pauses: GCPauses, freezes: int) -> None:
    """Wait until the loop has run the freeze that follows the ``freezes``-th collection."""
    for _ in range(1000):  # bounded: the loop runs it within a few turns
        if pauses.statistics().freezes >= freezes:
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError(f"no freeze {freezes}: {pauses.statistics()}")


async def test_a_full_collection_is_timed_and_its_survivors_frozen() -> None:
    async with GCPauses() as pauses:
        assert GCPauses.current() is pauses
        gc.collect()
        await frozen_after(pauses, 1)
        statistics = pauses.statistics()
        assert statistics.full_collections == 1
        assert 0 < statistics.last_pause == statistics.longest_pause == statistics.total_pause
        assert statistics.frozen > 0
        assert gc.get_freeze_count() > 0
        gc.collect(1)  # a younger generation's collection is not a full one
        assert pauses.statistics().full_collections == 1
    assert GCPauses.current() is None
    assert gc.get_freeze_count() == 0, "uninstall thaws what it froze"
    assert pauses.statistics().frozen == 0


async def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    async with GCPauses() as pauses:
        alone = Node()
        gone = weakref.ref(alone)
        gc.collect()
        await frozen_after(pauses, 1)
        del alone
        assert gone() is None


async def test_a_frozen_cycle_is_freed_once_the_permanent_generation_has_grown() -> None:
    """The documented cost of freezing, and its bound: a cycle frozen while reachable stays
    until the permanent generation has grown to ``regrow`` times its size; then it is
    thawed and the whole heap collected, which frees it."""
    async with GCPauses(regrow=1.05) as pauses:
        gc.collect()
        await frozen_after(pauses, 1)
        baseline = pauses.statistics().frozen
        cycle = Node()
        cycle.other = cycle
        gone = weakref.ref(cycle)
        gc.collect()
        await frozen_after(pauses, 2)
        del cycle
        gc.collect()
        await frozen_after(pauses, 3)
        assert gone() is not None, "a frozen cycle is not collected"
        assert pauses.statistics().thaws == 0
        grown = [Node() for _ in range(baseline // 10)]
        collections = pauses.statistics().full_collections
        gc.collect()
        await frozen_after(pauses, 4)
        statistics = pauses.statistics()
        assert statistics.thaws == 1
        assert statistics.full_collections == collections + 2, "the thaw collected it all"
        assert gone() is None, "the thaw's whole collection freed the cycle"
        await frozen_after(pauses, 5)
        assert pauses.statistics().frozen >= len(grown), "frozen again, a new baseline"
        assert pauses.statistics().thaws == 1


async def test_measuring_only_never_freezes() -> None:
    async with GCPauses(freeze=False) as pauses:
        gc.collect()
        gc.collect()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        statistics = pauses.statistics()
        assert (statistics.full_collections, statistics.freezes) == (2, 0)
        assert gc.get_freeze_count() == 0


async def test_one_per_process() -> None:
    async with GCPauses():
        with pytest.raises(RuntimeError, match="installed in this process already"):
            GCPauses().install()


def test_it_is_installed_in_an_event_loop_only() -> None:
    with pytest.raises(RuntimeError, match="inside a running asyncio or trio loop"):
        GCPauses().install()
    assert GCPauses.current() is None


@pytest.mark.parametrize("regrow", [1, 0.5, -1.0, float("nan")])
def test_regrow_must_be_more_than_one(regrow: float) -> None:
    with pytest.raises(ValueError, match="regrow must be more than 1"):
        GCPauses(regrow=regrow)


def test_a_collection_after_its_loop_closed_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Installed in a loop that ended without uninstalling it: the next full collection
    cannot hand the freeze to the loop, and says nothing (a collector callback that raises
    is printed as an unraisable exception, in whatever code allocated)."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    pauses = GCPauses()

    async def install() -> None:
        pauses.install()

    asyncio.run(install())
    gc.collect()
    assert unraisable == []
    assert pauses.statistics().full_collections == 1
    assert pauses.statistics().freezes == 0
    pauses.uninstall()
    assert GCPauses.current() is None
    pauses.uninstall()  # twice: nothing
