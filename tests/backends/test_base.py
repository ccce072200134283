"""What wsbroadcast.backend gives every backend: backend_from_url and the default rate limit
(the memory backend stands in for a backend that keeps it)."""

from __future__ import annotations

import math
import sys

import pytest

from wsbroadcast import InvalidBackendURL, InvalidInput, backend_from_url
from wsbroadcast.backends.memory import MemoryBackend

pytestmark = pytest.mark.anyio


def test_a_url_of_a_backend_whose_extra_is_missing_says_which_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wsbroadcast.backends.redis", None)  # import fails
    with pytest.raises(InvalidBackendURL, match=r"pip install 'wsbroadcast\[redis\]'"):
        backend_from_url("redis://127.0.0.1:6379/0")
    with pytest.raises(InvalidBackendURL, match="expected one of memory://"):
        backend_from_url("kafka://broker")


async def test_rate_limit_buckets_refill_refuse_bad_rates_and_stay_bounded() -> None:
    backend = MemoryBackend()
    backend.max_buckets = 2
    assert [await backend.allow("a", 0.001, 2) for _ in range(3)] == [True, True, False]
    assert await backend.allow("b", 0.001, 1)
    assert await backend.allow("c", 0.001, 1)  # three keys: "a", the least recent, is forgotten
    assert await backend.allow("a", 0.001, 1)  # a full bucket again
    for rate, burst in ((0.0, 1.0), (1.0, 0.5), (math.inf, 1.0), (1.0, math.nan)):
        with pytest.raises(InvalidInput, match="need rate > 0"):
            await backend.allow("a", rate, burst)
