"""Broker faults: dropped connections, Redis killed and restarted empty."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import anyio
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, KeyT

from tests.backends.redis.redis_helpers import ASYNCIO_ONLY, Recorder, RedisServer, eventually
from wsbroadcast import Envelope
from wsbroadcast.backends.base import StreamReset
from wsbroadcast.backends.redis import RedisBackend
from wsbroadcast.exceptions import BackendError, BackendUnavailable

pytestmark = [pytest.mark.anyio, ASYNCIO_ONLY]

Make = Callable[..., RedisBackend]


async def test_reader_resumes_where_it_stopped_after_connections_drop(
    make_backend: Make, redis_server: RedisServer
) -> None:
    admin = Redis.from_url(redis_server.url)
    try:
        async with make_backend() as a, make_backend() as b:
            recorder = Recorder()
            await a.subscribe("r", recorder)
            await b.publish("r", "message", "bob", 0)
            with anyio.fail_after(5):
                await recorder.wait_for(1)
                # Cut every connection but ours, then publish while a's reader reconnects:
                # b's publish finds its pooled connection dead and retries on a new one.
                await admin.client_kill_filter(_type="normal", skipme=True)
                for i in range(1, 20):
                    await b.publish("r", "message", "bob", i)
                await recorder.wait_for(20)
                await eventually(lambda: a.health().status == "ok")
        assert recorder.seqs == list(range(1, 21))
        assert [e.data for e in recorder.envelopes] == list(range(20))
        assert b.health().publish_failures == 0
    finally:
        await admin.aclose()


async def test_redis_restarted_empty(make_backend: Make, redis_server: RedisServer) -> None:
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        await a.add_presence("r", "alice")
        for i in range(3):
            await b.publish("r", "message", "bob", i)
        with anyio.fail_after(10):
            await recorder.wait_for(3)
            old_epoch = recorder.envelopes[0].epoch

            redis_server.kill()
            with pytest.raises(BackendUnavailable):
                await b.publish("r", "message", "bob", "lost?")
            with pytest.raises(BackendUnavailable):
                await b.history("r", 0)
            await eventually(lambda: a.health().status == "degraded")
            await eventually(lambda: b.health().status == "degraded")
            assert a.health().connected is False
            assert "Error" in str(a.health().last_error)

            await anyio.to_thread.run_sync(redis_server.start)
            await eventually(lambda: a.health().status == "ok")
            await eventually(lambda: b.health().status == "ok")
            assert a.health().reconnects == 1

            # a notices the loss, resets its listeners, and restores alice's presence (join).
            await eventually(lambda: a.health().data_losses == 1)
            await recorder.wait_for(4)
            assert await b.presence("r") == ["alice"]
            after = await b.publish("r", "message", "bob", "after")
            await recorder.wait_for(5)

        # The listener was told, before any envelope of the new stream, that it restarted.
        reset = recorder.events[3]
        assert isinstance(reset, StreamReset)
        assert (reset.room, reset.after_seq) == ("r", 0)
        new_epoch = reset.epoch
        assert new_epoch != old_epoch
        join = recorder.envelopes[3]
        assert (join.type, join.client_id) == ("join", "alice")
        assert recorder.envelopes[4].id == after.id
        # The new stream starts at 1 under its new epoch: no silent jump, no reused numbers.
        assert (join.seq, join.epoch) == (1, new_epoch)
        assert (after.seq, after.epoch) == (2, new_epoch)
        assert all(isinstance(event, Envelope) for event in recorder.events[4:])
        # A client resuming in the old epoch is told history is lost.
        for node in (a, b):
            for since in (2, 3):
                history = await node.history("r", since, old_epoch)
                assert not history.complete, since
                assert history.envelopes == ()
                assert history.epoch == new_epoch
        resumed = await a.history("r", join.seq, new_epoch)
        assert resumed.complete
        assert [e.id for e in resumed.envelopes] == [after.id]
        assert b.health().data_losses == 1
        assert b.health().publish_failures == 1


async def test_departure_that_failed_during_an_outage_is_resynced(
    make_backend: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_backend() as a, make_backend() as b:
        recorder = Recorder()
        await b.subscribe("r", recorder)
        assert await a.add_presence("r", "alice")
        assert await a.add_presence("r", "bob")
        real = a._remove_presence_script

        async def unreachable(*args: object, **kwargs: object) -> object:
            raise RedisConnectionError("Connection reset by peer")

        monkeypatch.setattr(a, "_remove_presence_script", unreachable)
        with pytest.raises(BackendUnavailable):
            await a.remove_presence("r", "alice")
        monkeypatch.setattr(a, "_remove_presence_script", real)
        with anyio.fail_after(5):
            # Redis still counts alice on a; a's next heartbeat finds the stale entry.
            await recorder.wait_for(1)
            await eventually(lambda: a.health().status == "ok")
        assert [(e.type, e.client_id) for e in recorder.envelopes] == [("leave", "alice")]
        assert await b.presence("r") == ["bob"]
        assert not await a.remove_presence("r", "alice")
        assert await a.remove_presence("r", "bob")


async def test_retried_publish_is_not_published_twice(
    make_backend: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with make_backend() as a:
        real = a._publish_script
        calls = 0

        async def reply_lost(
            keys: Sequence[KeyT] | None = None,
            args: Iterable[EncodableT] | None = None,
            client: Redis | RedisCluster | None = None,
        ) -> object:
            nonlocal calls
            calls += 1
            result = await real(keys=keys, args=args, client=client)
            if calls == 1:
                raise RedisConnectionError("Connection closed by server.")
            return result

        monkeypatch.setattr(a, "_publish_script", reply_lost)
        envelope = await a.publish("r", "message", "alice", "once")
        assert calls == 2
        history = await a.history("r", 0)
        assert [e.id for e in history.envelopes] == [envelope.id]
        assert envelope.seq == 1


async def test_reader_cut_off_past_history_tells_a_gap(
    make_backend: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    trim = {"history_size": 3, "exact_trim": True}  # the publisher trims
    async with make_backend(**trim) as a, make_backend(**trim) as b:
        recorder = Recorder()
        await a.subscribe("r", recorder, recorder.reset)
        await b.publish("r", "message", "bob", 1)
        with anyio.fail_after(5):
            await recorder.wait_for(1)
            assert a._reader is not None
            real = a._reader.pipeline

            def cut(*args: object, **kwargs: object) -> object:
                raise RedisConnectionError("Connection reset by peer")

            monkeypatch.setattr(a._reader, "pipeline", cut)
            await eventually(lambda: a.health().status == "degraded")
            for i in range(2, 11):
                await b.publish("r", "message", "bob", i)
            monkeypatch.setattr(a._reader, "pipeline", real)
            await recorder.wait_for(4)
        # Only the last 3 were still in the stream: the listener is told 2 to 7 are lost
        # before it gets 8.
        assert recorder.seqs == [1, 8, 9, 10]
        epoch = recorder.envelopes[0].epoch
        assert recorder.events[1] == StreamReset("r", epoch, 7)
        assert recorder.events[2] == recorder.envelopes[1]
        assert a.health().gaps == 1
        assert "envelopes 2 to 7 were trimmed" in caplog.text


async def test_redis_refusing_writes_raises_backend_errors(
    make_backend: Make, redis_server: RedisServer
) -> None:
    """A Redis that answers with an error (here out of memory) raises BackendError from every
    call, never redis-py's own exceptions, so an application can answer its client."""
    admin = Redis.from_url(redis_server.url)
    try:
        async with make_backend() as a:
            await a.add_presence("r", "alice")
            await admin.config_set("maxmemory", 1)
            with anyio.fail_after(10):
                with pytest.raises(BackendError):
                    await a.publish("r", "message", "bob", 1)
                with pytest.raises(BackendError):
                    await a.subscribe("new", Recorder())
                with pytest.raises(BackendError):
                    await a.add_presence("r", "bob")
                with pytest.raises(BackendError):
                    await a.history("r", 0)  # MULTI is refused too
                assert await a.presence("r") == ["alice"]
                assert await a.remove_presence("r", "alice")  # deleting is allowed
                assert await a.presence("r") == []
            await admin.config_set("maxmemory", 0)
            assert a.health().publish_failures == 1
    finally:
        await admin.aclose()
