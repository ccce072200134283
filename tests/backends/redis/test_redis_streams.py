"""Epochs, explicit resets and bounded memory of the Redis backend, against a real server.

Each test breaks Redis the way production does (FLUSHALL, a lost room, a log rolled back to
an older snapshot, a trimmed or corrupt entry) and checks that every listener is told
(``on_reset``) before any envelope it cannot tell apart from the old stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, Recorder, RedisServer, eventually
from wsbroadcast import Envelope
from wsbroadcast.backends.base import StreamReset
from wsbroadcast.backends.redis import DEFAULT_HISTORY_BYTES, RedisBackend
from wsbroadcast.envelope import Draft

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

Make = Callable[..., RedisBackend]
PREFIX = "wsbroadcast:"


@pytest.fixture
async def admin(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client on the test's server, to break things behind the backend's back."""
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def room_keys(room: str) -> list[str]:
    return [f"{PREFIX}room:{room}:{part}" for part in ("stream", "log", "members")]


def new_stream_after_reset(recorder: Recorder, before: int) -> tuple[StreamReset, list[Envelope]]:
    """The reset that follows the first ``before`` events, and every envelope after it;
    checks that nothing but envelopes of the reset's epoch, from seq 1 on, came after it."""
    reset = recorder.events[before]
    assert isinstance(reset, StreamReset), recorder.events
    after = recorder.events[before + 1 :]
    assert all(isinstance(event, Envelope) for event in after), recorder.events
    envelopes = [event for event in after if isinstance(event, Envelope)]
    assert [e.epoch for e in envelopes] == [reset.epoch] * len(envelopes)
    assert [e.seq for e in envelopes] == list(range(1, len(envelopes) + 1))
    return reset, envelopes


async def test_each_room_stream_has_its_own_epoch_and_seq_from_one(make_backend: Make) -> None:
    async with make_backend() as a, make_backend() as b:
        first = await a.publish("one", "message", "x", 1)
        other = await b.publish("two", "message", "x", 2)
        second = await b.publish("one", "message", "x", 3)
        assert (first.seq, other.seq, second.seq) == (1, 1, 2)
        assert first.epoch == second.epoch != other.epoch
        history = await a.history("one", 1, first.epoch)
        assert history.complete
        assert history.epoch == first.epoch
        assert [e.text for e in history.envelopes] == [second.text]
        # The stored text is final: seq and epoch were spliced in by the script.
        assert history.envelopes[0].text == second.model_dump_json()
        # Resuming with another epoch (a stream the client saw before a loss) is refused.
        stale = await a.history("one", 1, "deadbeef")
        assert (stale.complete, stale.envelopes, stale.epoch) == (False, (), first.epoch)
        assert (await a.history("one", 0, "deadbeef")).complete  # since=0: everything


async def test_flushall_resets_listeners_before_the_new_stream(
    make_backend: Make, admin: Redis
) -> None:
    async with make_backend() as a, make_backend() as b:
        recorders = [Recorder(), Recorder()]
        for node, recorder in zip((a, b), recorders, strict=True):
            await node.subscribe("r", recorder, recorder.reset)
        old = [await b.publish("r", "message", "bob", i) for i in range(3)]
        with anyio.fail_after(10):
            for recorder in recorders:
                await recorder.wait_for(3)
            await admin.flushall()
            new = [await b.publish("r", "message", "bob", i) for i in range(3, 5)]
            for recorder in recorders:
                await recorder.wait_for(5)
            await eventually(lambda: a.health().data_losses == 1)
        for recorder in recorders:
            assert recorder.events[:3] == old
            reset, envelopes = new_stream_after_reset(recorder, 3)
            assert (reset.room, reset.after_seq) == ("r", 0)
            assert reset.epoch != old[0].epoch
            assert [e.id for e in envelopes] == [e.id for e in new]
        assert [e.epoch for e in new] == [reset.epoch] * 2
        history = await a.history("r", 3, old[0].epoch)
        assert not history.complete
        assert history.epoch == reset.epoch
        assert a.health().data_losses == b.health().data_losses == 1


async def test_lost_room_is_reset_even_if_nothing_is_published(
    make_backend: Make, admin: Redis
) -> None:
    """A room whose keys vanish (deleted, evicted) while a node reads it is reset at the
    node's next heartbeat, with a new epoch that every node then shares."""
    async with make_backend() as a:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        old = await a.publish("r", "message", "x", 1)
        with anyio.fail_after(5):
            await recorder.wait_for(1)
            await admin.delete(*room_keys("r"))
            await recorder.wait_for_resets(1)
            after = await a.publish("r", "message", "x", 2)
            await recorder.wait_for(2)
        reset, envelopes = new_stream_after_reset(recorder, 1)
        assert reset.epoch != old.epoch
        assert [e.id for e in envelopes] == [after.id]
        assert after.epoch == reset.epoch


@pytest.mark.parametrize("caught_up", [False, True], ids=["behind", "caught-up"])
async def test_log_rolled_back_to_an_older_snapshot_is_reset(
    make_backend: Make, admin: Redis, monkeypatch: pytest.MonkeyPatch, caught_up: bool
) -> None:
    """Redis restored from an older snapshot: the counter went back below what a node
    delivered (``behind``), or other writers already numbered new envelopes past it with
    reused seqs (``caught-up``). The node checks on reconnect and gives the room a new epoch
    instead of delivering reused numbers."""
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        old = [await b.publish("r", "message", "bob", i) for i in range(5)]
        epoch = old[0].epoch
        with anyio.fail_after(10):
            await recorder.wait_for(5)
            gate = anyio.Event()
            real_check = a._check_rooms

            async def gated(*, poke: bool) -> None:
                await gate.wait()
                await real_check(poke=poke)

            monkeypatch.setattr(a, "_check_rooms", gated)
            assert a._reader is not None
            real_pipeline = a._reader.pipeline

            def cut(*args: object, **kwargs: object) -> object:
                raise RedisConnectionError("Connection reset by peer")

            monkeypatch.setattr(a._reader, "pipeline", cut)
            await eventually(lambda: a._check_pending)
            monkeypatch.setattr(a._reader, "pipeline", real_pipeline)
            # Roll the room back to seq 3, as an older snapshot would have it ...
            kept = await admin.xrange(f"{PREFIX}room:r:log", max="3-0")
            async with admin.pipeline(transaction=True) as pipe:
                pipe.hset(f"{PREFIX}room:r:stream", "seq", 3)
                pipe.delete(f"{PREFIX}room:r:log")
                assert kept is not None
                for entry_id, fields in kept:
                    assert entry_id is not None
                    assert fields is not None
                    entry = dict[FieldT, EncodableT](fields.items())  # dict is invariant
                    pipe.xadd(f"{PREFIX}room:r:log", entry, id=entry_id)
                if caught_up:
                    # ... and let another writer reuse 4, 5 and 6 in the same epoch.
                    for seq in (4, 5, 6):
                        text = Draft("message", "r", "mallory", seq).text(seq, epoch)
                        pipe.xadd(f"{PREFIX}room:r:log", {"e": text}, id=f"{seq}-0")
                    pipe.hset(f"{PREFIX}room:r:stream", "seq", 6)
                await pipe.execute()
            gate.set()
            await recorder.wait_for_resets(1)
            after = await b.publish("r", "message", "bob", "after")
            await recorder.wait_for(6)
        assert recorder.events[:5] == old
        reset, envelopes = new_stream_after_reset(recorder, 5)
        assert reset.epoch != epoch
        assert [e.id for e in envelopes] == [after.id]
        assert not (await b.history("r", 5, epoch)).complete


async def test_unreadable_entry_is_told_as_a_gap(make_backend: Make, admin: Redis) -> None:
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        first = await b.publish("r", "message", "bob", 1)
        with anyio.fail_after(5):
            await recorder.wait_for(1)
            async with admin.pipeline(transaction=True) as pipe:
                pipe.xadd(f"{PREFIX}room:r:log", {"e": "not json"}, id="2-0")
                pipe.hset(f"{PREFIX}room:r:stream", "seq", 2)
                await pipe.execute()
            third = await b.publish("r", "message", "bob", 3)
            await recorder.wait_for(2)
        assert third.seq == 3
        assert recorder.events == [first, StreamReset("r", first.epoch, 2), third]
        assert a.health().gaps == 1


@pytest.mark.parametrize("since", [2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30, -1])
async def test_since_beyond_any_seq_is_incomplete(make_backend: Make, since: int) -> None:
    async with make_backend() as a:
        await a.publish("r", "message", "x", 1)
        history = await a.history("r", since)
        assert (history.complete, history.envelopes, history.last_seq) == (False, (), 1)
        nothing = await a.history("empty", since)
        assert not nothing.complete


async def wait_until_gone(admin: Redis, keys: list[str]) -> None:
    """Poll (bounded by the caller's fail_after) until none of ``keys`` exists."""
    while await admin.exists(*keys):  # noqa: ASYNC110
        await anyio.sleep(0.02)


async def test_rooms_nobody_uses_are_forgotten_after_history_ttl(
    make_backend: Make, admin: Redis
) -> None:
    async with make_backend(history_ttl=0.3) as a, make_backend(history_ttl=0.3) as b:
        listened = Recorder()
        await a.subscribe("listened", listened, listened.reset)
        assert await b.add_presence("present", "carol")
        old = {}
        for room in ("idle", "listened", "present"):
            old[room] = await a.publish(room, "message", "x", room)
        with anyio.fail_after(5):
            await listened.wait_for(1)
            await wait_until_gone(admin, room_keys("idle"))
            # Well past the TTL of the idle room: rooms that are used are still there.
            for room in ("listened", "present"):
                expected = 3 if room == "present" else 2  # nobody is present in "listened"
                assert await admin.exists(*room_keys(room)) == expected, room
                assert 0 < await admin.pttl(f"{PREFIX}room:{room}:stream") <= 300
            assert await admin.exists(f"{PREFIX}room:present:client:carol")
            assert await a.presence("present") == ["carol"]
        assert (await a.history("listened", 0)).envelopes == (old["listened"],)
        forgotten = await a.history("idle", 0)
        assert (forgotten.last_seq, forgotten.epoch) == (0, "")
        reborn = await a.publish("idle", "message", "x", "again")
        assert reborn.seq == 1
        assert reborn.epoch != old["idle"].epoch
        assert listened.resets == []
        # Once nobody is left, the room with presence is forgotten too.
        assert await b.remove_presence("present", "carol")
        with anyio.fail_after(5):
            await wait_until_gone(
                admin, [*room_keys("present"), f"{PREFIX}room:present:client:carol"]
            )


async def test_every_key_but_the_generation_expires(make_backend: Make, admin: Redis) -> None:
    """Nothing a node writes can stay in Redis forever once nobody uses it."""
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        await a.add_presence("r", "alice")
        await b.add_presence("s", "bob")
        await b.publish("r", "message", "bob", 1)
        await b.publish("s", "message", "bob", 2)
        assert await a.allow("client:bob", 1.0, 5)
        with anyio.fail_after(5):
            await recorder.wait_for(1)
        # str at run time (decode_responses=True); the stubs say bytes | str.
        keys = sorted(k if isinstance(k, str) else k.decode() for k in await admin.keys("*"))
        assert f"{PREFIX}generation" in keys
        assert any(":receipt:" in key for key in keys)
        assert any(":rate:" in key for key in keys)
        assert any(key.endswith(":presence") for key in keys)
        for key in keys:
            if key != f"{PREFIX}generation":
                assert await admin.pttl(key) > 0, key


async def test_history_is_bounded_in_bytes(make_backend: Make, admin: Redis) -> None:
    payload = "\u0001" * 4000  # 24,000 bytes of JSON ("\\u0001" each)
    async with make_backend() as a:
        published = [await a.publish("big", "message", "x", payload) for _ in range(1000)]
        size = len(published[0].text.encode())
        assert size > 24_000
        length = await admin.xlen(f"{PREFIX}room:big:log")
        assert length * size <= DEFAULT_HISTORY_BYTES < (length + 1) * size
        stored = int(await admin.hget(f"{PREFIX}room:big:stream", "bytes") or 0)
        assert stored == sum(len(e.text.encode()) for e in published[-length:])
        memory = await admin.memory_usage(f"{PREFIX}room:big:log")
        assert memory is not None
        assert memory < 2 * DEFAULT_HISTORY_BYTES
        kept = await a.history("big", 1000 - length)
        assert kept.complete
        assert [e.id for e in kept.envelopes] == [e.id for e in published[-length:]]
        assert not (await a.history("big", 999 - length)).complete


async def test_count_and_bytes_budgets_hold_together(make_backend: Make, admin: Redis) -> None:
    async with make_backend(history_size=5, history_bytes=2000, exact_trim=True) as a:
        for i in range(20):
            await a.publish("r", "message", "x", "y" * (50 if i < 10 else 700))
        # 5 by count, but only 2 of the 700-byte envelopes fit in 2000 bytes.
        assert await admin.xlen(f"{PREFIX}room:r:log") == 2
        # An envelope larger than the budget is still kept alone, for the readers.
        huge = await a.publish("r", "message", "x", "z" * 5000)
        history = await a.history("r", huge.seq - 1)
        assert history.complete
        assert [e.id for e in history.envelopes] == [huge.id]
        small = await a.publish("r", "message", "x", "small")
        assert [e.id for e in (await a.history("r", huge.seq)).envelopes] == [small.id]
        assert not (await a.history("r", huge.seq - 1)).complete


async def test_allow_is_one_bucket_across_nodes(
    make_backend: Make, admin: Redis, redis_server: RedisServer
) -> None:
    async with make_backend() as a, make_backend() as b:
        answers = []
        for i in range(8):
            answers.append(await (a if i % 2 else b).allow("user:1", 0.001, 3))
        assert answers == [True] * 3 + [False] * 5
        assert await a.allow("user:2", 0.001, 3)  # another key, another bucket
        ttl = await admin.pttl(f"{PREFIX}rate:user:1")
        assert 0 < ttl <= 3 / 0.001 * 1000 + 1000
        with pytest.raises(ValueError, match="rate"):
            await a.allow("user:1", 0, 3)
        redis_server.kill()
        from wsbroadcast.exceptions import BackendUnavailable

        with pytest.raises(BackendUnavailable):
            await a.allow("user:1", 1.0, 3)


async def test_frozen_redis_shows_as_degraded_then_recovers(
    make_backend: Make, redis_server: RedisServer
) -> None:
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        await b.publish("r", "message", "bob", 1)
        with anyio.fail_after(10):
            await recorder.wait_for(1)
            assert a.health().status == "ok"
            redis_server.stop()
            try:
                # Bounded by fail_after, not measured: within about 2 x command_timeout.
                await eventually(lambda: a.health().status == "degraded")
                assert a.health().responsive is False
            finally:
                redis_server.resume()
            await eventually(lambda: a.health().status == "ok")
            await b.publish("r", "message", "bob", 2)
            await recorder.wait_for(2)
        # Nothing was lost: no reset, the stream continues.
        assert recorder.resets == []
        assert recorder.seqs == [1, 2]


async def test_refused_writes_degrade_health_until_a_write_succeeds(
    make_backend: Make, admin: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from wsbroadcast.exceptions import BackendError

    async with make_backend() as a:
        await a.publish("r", "message", "x", 0)
        assert a.health().status == "ok"
        await admin.config_set("maxmemory", 1)
        try:
            for i in range(3):
                with pytest.raises(BackendError):
                    await a.publish("r", "message", "x", i)
            health = a.health()
            assert (health.status, health.writable, health.connected) == (
                "degraded",
                False,
                True,
            )
        finally:
            await admin.config_set("maxmemory", 0)
        await a.publish("r", "message", "x", "ok again")
        assert a.health().status == "ok"
        assert caplog.text.count("Redis refuses writes") == 1
