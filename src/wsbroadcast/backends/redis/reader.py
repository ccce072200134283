"""The Redis backend's subscriptions and stream reader.

One reader task per backend does a single blocking ``XREAD`` over the logs of the rooms with
local listeners (and its wake stream), and calls the listeners in seq order, or tells them a
`StreamReset` first when it cannot. It also checks the streams
of the rooms it reads after an outage or a data loss, and every heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
from redis.exceptions import RedisError

from ...envelope import Envelope, new_epoch
from ...exceptions import BackendError
from ..base import Listener, ResetListener, StreamReset, Subscription
from .keys import Partition, entry_seq, key_part
from .link import RedisLink

logger = logging.getLogger("wsbroadcast.backends.redis")

_CHECK_CHUNK = 500
"""Rooms per script call when checking and refreshing rooms (bounds how long Redis is busy)."""


class _Subscriber:
    __slots__ = ("listener", "on_reset", "start")

    def __init__(self, listener: Listener, on_reset: ResetListener | None, start: int) -> None:
        self.listener = listener
        self.on_reset = on_reset
        self.start = start
        """Envelopes with ``seq <= start`` were published before ``subscribe`` returned."""


class _RoomCursor:
    """What this node's reader knows of one room's stream."""

    __slots__ = ("epoch", "last_id", "last_seq", "position", "subscribers", "version")

    def __init__(self, epoch: str, last_seq: int) -> None:
        self.subscribers: list[_Subscriber] = []
        self.epoch = epoch
        """The stream being read ("" until the room has one)."""
        self.last_seq = last_seq
        """The last seq handled (delivered, or told as a gap)."""
        self.last_id = ""
        """The envelope id of ``last_seq`` if it was delivered (to detect a rolled-back log)."""
        self.position = f"{last_seq}-0"
        """The stream id the reader reads after: the last entry it handled."""
        self.version = 0
        """Bumped when the stream restarts, so that reads begun before are discarded."""


class _RedisSubscription:
    def __init__(self, backend: RedisReader, room: str, subscriber: _Subscriber) -> None:
        self._backend = backend
        self._room = room
        self._subscriber: _Subscriber | None = subscriber

    async def aclose(self) -> None:
        if self._subscriber is not None:
            self._backend._unsubscribe(self._room, self._subscriber)
            self._subscriber = None


class RedisReader(RedisLink):
    """Subscriptions, the reader task that delivers every room's log, and the room checks."""

    # -- subscriptions and the reader

    async def subscribe(
        self, room: str, listener: Listener, on_reset: ResetListener | None = None
    ) -> Subscription:
        """Register ``listener``; it gets the envelopes numbered after the room's current seq.

        ``on_reset`` is called before any envelope that follows a reset of the room's stream
        or a gap in it (see `StreamReset`).
        """
        client = self._client()
        with self._commands(f"subscribe to {room!r}"):
            raw_seq, raw_epoch = await client.hmget(self._keys.stream(room), "seq", "epoch")
        current = int(raw_seq or 0) if raw_epoch is not None else 0
        epoch = str(raw_epoch or "")
        state = self._rooms.get(room)
        created = state is None
        partition = self._partitions[self._keys.partition(room)]
        if state is None:
            state = self._rooms[room] = partition.rooms[room] = _RoomCursor(epoch, current)
        start = max(current, state.last_seq) if epoch == state.epoch else state.last_seq
        subscriber = _Subscriber(listener, on_reset, start)
        state.subscribers.append(subscriber)
        if created:
            if not partition.reading:
                self._start_reader(partition)
            try:
                with self._commands(f"subscribe to {room!r}"):
                    await self._poke(client, partition.index)
            except BackendError:
                self._unsubscribe(room, subscriber)
                raise
        return _RedisSubscription(self, room, subscriber)

    def _unsubscribe(self, room: str, subscriber: _Subscriber) -> None:
        state = self._rooms.get(room)
        if state is None or subscriber not in state.subscribers:
            return
        state.subscribers.remove(subscriber)
        if not state.subscribers:
            # The reader drops the room from its XREAD the next time it re-arms.
            del self._rooms[room]
            del self._partitions[self._keys.partition(room)].rooms[room]

    def _start_reader(self, partition: Partition) -> None:
        """Start the reader task of ``partition``; it runs until the backend exits."""
        assert self._task_group is not None
        partition.reading = True
        self._task_group.start_soon(self._run_reader, partition)

    def _route(self, partition: int) -> str:
        """The server that the reader's client sends ``partition``'s commands to now.

        One Redis has one server (""). A cluster overrides this: a change means another
        primary serves the partition (a failover, or its slot moved), whose data must be
        checked before anything is read from it.
        """
        return ""

    async def _run_reader(self, partition: Partition) -> None:
        """Read ``partition``'s rooms with one blocking ``XREAD`` at a time, until cancelled.

        Before each read: the partition's generation is read afresh if it is unsure, and
        its rooms are checked if an outage, a data loss or a change of server may have
        rolled them back. A read answered by another server than the one the rooms were
        checked on is discarded, and read again after the check.
        """
        assert self._reader is not None
        reader = self._reader
        index = partition.index
        wake = self._keys.wake(index)
        failures = 0
        while True:
            try:
                route = self._route(index)
                if partition.route != route:
                    if partition.route is not None:
                        partition.check_pending = True
                    partition.route = route
                if partition.generation is None or partition.generation_unsure:
                    await self._sync_generation(partition)
                if partition.check_pending:
                    # After an outage, a data loss or a failover, before reading on: a room
                    # whose stream was lost or rolled back is reset, not read from a stale
                    # position.
                    await self._check_rooms(poke=False)
                rooms = {name: (state, state.version) for name, state in partition.rooms.items()}
                streams: dict[Any, Any] = {wake: partition.wake_id}
                by_key: dict[str, str] = {}
                for name, (state, _) in rooms.items():
                    key = self._keys.log(name)
                    streams[key] = state.position
                    by_key[key] = name
                async with reader.pipeline(transaction=False) as pipe:
                    pipe.hget(self._keys.generation(index), "id")
                    pipe.xread(streams, count=self.read_count, block=int(self.block_timeout * 1000))
                    generation, response = await pipe.execute()
            except self._unreachable as exc:
                self._mark_down(exc)
                failures += 1
                await anyio.sleep(self._backoff(failures))
                continue
            except RedisError as exc:
                self._mark_up()
                if failures == 0:
                    logger.error("Redis refused the reader's XREAD: %r", exc)
                failures += 1
                await anyio.sleep(self._backoff(failures))
                continue
            failures = 0
            self._mark_up()
            if self._route(index) != route:
                # Answered by a server the rooms were not checked on: check, then read again.
                partition.check_pending = True
                continue
            if generation != partition.generation:
                # Redis lost its data, or another node already noticed and made a new
                # generation, or this read began before this node adopted the new one: the
                # next turn reads it afresh (creating it if it is gone), then checks the rooms.
                partition.generation_unsure = True
                continue
            for key, entries in response or ():
                if key == wake:
                    partition.wake_id = entries[-1][0]
                    continue
                name = by_key[key]
                state, version = rooms[name]
                if self._rooms.get(name) is state and state.version == version:
                    self._deliver(name, state, entries)

    def _deliver(
        self, room: str, state: _RoomCursor, entries: list[tuple[str, Mapping[str, str]]]
    ) -> None:
        """Hand a room's entries to its listeners in seq order; never skip one silently.

        An entry of another epoch means the stream was restarted under this reader: the
        listeners are reset and the new stream is read from its start. A seq beyond the
        next one (entries trimmed before this node read them) and an entry that cannot be
        parsed are told as a reset with ``after_seq`` = the last seq not delivered.
        """
        for entry_id, entry in entries:
            seq = entry_seq(entry_id)
            try:
                envelope: Envelope | None = Envelope.from_text(entry["e"])
            except (KeyError, ValueError):
                envelope = None
            if envelope is not None and envelope.epoch != state.epoch:
                if state.epoch:
                    self._restart(room, state, envelope.epoch)
                    return
                state.epoch = envelope.epoch  # the room's first stream since we subscribed
            state.position = entry_id
            if seq <= state.last_seq:
                continue
            if envelope is None or envelope.seq != seq:
                logger.error(
                    "room %r: entry %s is not an envelope of this stream; its listeners are "
                    "told it is lost",
                    room,
                    entry_id,
                )
                self._gaps += 1
                self._tell_reset(room, state, StreamReset(room, state.epoch, seq))
                state.last_seq, state.last_id = seq, ""
                continue
            if seq != state.last_seq + 1:
                self._gaps += 1
                logger.warning(
                    "room %r: envelopes %d to %d were trimmed before this node read them; "
                    "its listeners are told they are lost",
                    room,
                    state.last_seq + 1,
                    seq - 1,
                )
                self._tell_reset(room, state, StreamReset(room, state.epoch, seq - 1))
            state.last_seq, state.last_id = seq, envelope.id
            for subscriber in tuple(state.subscribers):
                if seq > subscriber.start:
                    try:
                        subscriber.listener(envelope)
                    except Exception:
                        logger.exception("listener for room %r failed; it is skipped", room)

    def _restart(self, room: str, state: _RoomCursor, epoch: str) -> None:
        """The room's stream is now ``epoch`` (restarted): reset listeners, read it from 1.

        Logged at INFO per room: the data loss that usually causes it is one WARNING.
        """
        logger.info(
            "room %r: its stream %r was lost or restarted as %r; listeners are reset",
            room,
            state.epoch,
            epoch,
        )
        state.version += 1
        state.epoch = epoch
        state.last_seq = 0
        state.last_id = ""
        state.position = "0-0"
        for subscriber in state.subscribers:
            subscriber.start = 0
        self._tell_reset(room, state, StreamReset(room, epoch, 0))

    def _tell_reset(self, room: str, state: _RoomCursor, reset: StreamReset) -> None:
        self._resets += 1
        for subscriber in tuple(state.subscribers):
            if subscriber.on_reset is not None:
                try:
                    subscriber.on_reset(reset)
                except Exception:
                    logger.exception("reset listener for room %r failed; it is skipped", room)

    async def _check_rooms(self, *, poke: bool) -> None:
        """Check the streams of the rooms this node reads, and keep every room it uses alive.

        A stream that is gone, or was rolled back (Redis restored from an older snapshot, or
        a replica promoted before it had every write: its counter is below what this node
        delivered, or its entry at that seq is another envelope), is given a new epoch in
        Redis atomically, and the room is restarted here (``on_reset``, then read from seq
        1). The heartbeat (``poke``) checks every partition through the command client and
        re-arms the readers whose rooms it restarted; a reader (not ``poke``) checks the
        partitions whose check is pending, through its own client, before it reads on.
        """
        if poke:
            assert self._redis is not None
            client: Any = self._redis
            partitions = list(self._partitions)
        else:
            assert self._reader is not None
            client = self._reader
            partitions = [partition for partition in self._partitions if partition.check_pending]
        for partition in partitions:
            if poke:
                if await self._check_partition(partition, client):
                    await self._poke(client, partition.index)
                continue
            # Claimed now; a check that fails leaves it pending.
            partition.check_pending = False
            try:
                await self._check_partition(partition, client)
            except BaseException:
                partition.check_pending = True
                raise

    async def _check_partition(self, partition: Partition, client: Any) -> int:
        """Check (and keep alive) the rooms of one partition; return how many restarted."""
        index = partition.index
        rooms = {name: (state, state.version) for name, state in partition.rooms.items()}
        present = {
            room
            for room, _ in self._presence
            if room not in rooms and self._keys.partition(room) == index
        }
        groups: list[list[str]] = []
        for name, (state, _) in rooms.items():
            part = key_part(name)
            groups.append([part, state.epoch, str(state.last_seq), state.last_id, new_epoch()])
        groups.extend([key_part(name), "-", "0", "", ""] for name in sorted(present))
        if not groups:
            return 0
        results: list[str] = []
        for start in range(0, len(groups), _CHECK_CHUNK):
            chunk = groups[start : start + _CHECK_CHUNK]
            args: list[Any] = [self._room_ttl_ms, self._keys.room_prefix(index)]
            for group in chunk:
                args.extend(group)
            # The generation key names the partition's slot (the script reads no KEYS).
            answer = await self._check_rooms_script(
                keys=[self._keys.generation(index)], args=args, client=client
            )
            results.extend(str(value) for value in answer)
        self._mark_up()
        restarted = 0
        for position, (name, (state, version)) in enumerate(rooms.items()):
            epoch = results[2 * position]
            if self._rooms.get(name) is not state or state.version != version:
                continue
            if state.epoch and epoch != state.epoch:
                self._restart(name, state, epoch)
                restarted += 1
        if restarted:
            logger.warning(
                "%d rooms' streams were lost or rolled back in Redis; their listeners are reset",
                restarted,
            )
        return restarted

    async def _poke(self, client: Any, partition: int) -> None:
        """Re-arm the reader of ``partition``: its blocking read returns at once, starts over."""
        wake = self._keys.wake(partition)
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(wake, {"w": "1"}, maxlen=1, approximate=False)
            pipe.pexpire(wake, self._node_ttl_ms)
            await pipe.execute()
