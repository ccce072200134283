"""The Redis backend's presence: counts per node, the heartbeat, the reaper and the resync.

Each node counts its connections per (room, client) in Redis under its node id; a node is
live while its heartbeat key exists. The heartbeat also keeps the rooms the node uses alive
and checks them; the reaper removes what dead nodes held and announces their leaves; the
resync makes Redis hold exactly this node's connections again after an outage.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from redis.exceptions import RedisError

from ...exceptions import BackendError, BackendUnavailable
from .reader import RedisReader

logger = logging.getLogger("wsbroadcast.backends.redis")


class RedisPresence(RedisReader):
    """Presence across nodes, kept true by the heartbeat, the reaper and the resync."""

    # -- presence

    def _presence_keys(self, room: str, client_id: str) -> list[str]:
        """The client's hash, the room's members and this node's index: one partition."""
        return [
            self._keys.client(room, client_id),
            self._keys.room(room, "members"),
            self._keys.index(self._keys.partition(room), self.node_id),
        ]

    def _presence_args(self, room: str, client_id: str) -> list[str | int]:
        return [
            self.node_id,
            client_id,
            f"{room} {client_id}",
            self._keys.node_prefix(self._keys.partition(room)),
            self._room_ttl_ms,
            self._node_ttl_ms,
        ]

    async def add_presence(self, room: str, client_id: str) -> bool:
        """Count a connection of ``client_id`` on this node; true if no live node had one.

        Cancellation-safe: once the script is sent, it is awaited to its answer even if the
        caller is cancelled (shielded, bounded by the command timeouts), so the local count
        always matches Redis: if this returns, the connection is counted in both; if it
        raises, in neither (or, if the answer was lost, the next heartbeat makes Redis
        match this node again). A caller cancelled meanwhile gets the result and is
        cancelled at its next checkpoint, so it knows to remove the presence it holds.
        """
        client = self._client()
        key = (room, client_id)
        async with self._presence_change():
            # Counted locally first, so that a resync never takes it for a stale entry.
            self._presence[key] += 1
            try:
                with self._commands(f"add presence in {room!r}", write=True):
                    first = await self._shielded(
                        lambda: self._add_presence_script(
                            keys=self._presence_keys(room, client_id),
                            args=self._presence_args(room, client_id),
                            client=client,
                        )
                    )
            except BaseException:
                self._discount(room, client_id)
                # If Redis ran the script but its answer was lost, Redis counts one more
                # than this node: the resync after the outage removes it.
                self._resync_pending = True
                raise
        return bool(first)

    async def remove_presence(self, room: str, client_id: str) -> bool:
        """Count one connection less on this node; true if no live node holds one any more.

        The local count drops even if Redis cannot be reached (the connection is gone); the
        resync after the outage removes what Redis still holds and announces the leave. Like
        `add_presence`, the script is awaited to its answer even if the caller is
        cancelled, so the counts stay equal.
        """
        client = self._client()
        async with self._presence_change():
            if not self._discount(room, client_id):
                return False
            try:
                with self._commands(f"remove presence in {room!r}", write=True):
                    last = await self._shielded(
                        lambda: self._remove_presence_script(
                            keys=self._presence_keys(room, client_id),
                            args=self._presence_args(room, client_id),
                            client=client,
                        )
                    )
            except BaseException:
                self._resync_pending = True
                raise
        return bool(last)

    def _discount(self, room: str, client_id: str) -> bool:
        key = (room, client_id)
        if self._presence[key] <= 0:
            del self._presence[key]
            return False
        self._presence[key] -= 1
        if not self._presence[key]:
            del self._presence[key]
        return True

    @asynccontextmanager
    async def _presence_change(self) -> AsyncIterator[None]:
        """Let presence changes run concurrently with each other, but not with a resync."""
        while self._resyncing is not None:
            await self._resyncing.wait()
        self._presence_changes += 1
        try:
            yield
        finally:
            self._presence_changes -= 1
            if not self._presence_changes and self._presence_idle is not None:
                self._presence_idle.set()

    @asynccontextmanager
    async def _presence_resync(self) -> AsyncIterator[None]:
        """Hold presence changes off, and wait for those in flight, while resyncing."""
        while self._resyncing is not None:
            await self._resyncing.wait()
        done = self._resyncing = anyio.Event()
        try:
            while self._presence_changes:
                idle = self._presence_idle = anyio.Event()
                await idle.wait()
            yield
        finally:
            self._resyncing = None
            done.set()

    async def presence(self, room: str) -> list[str]:
        """The clients with a connection on a node whose heartbeat has not expired."""
        client = self._client()
        with self._commands(f"read presence in {room!r}"):
            members = await self._presence_script(
                keys=[self._keys.room(room, "members")],
                args=[
                    self._keys.room(room, "client", ""),
                    self._keys.node_prefix(self._keys.partition(room)),
                ],
                client=client,
            )
        return sorted(str(member) for member in members)

    # -- heartbeat

    async def _heartbeat(self) -> bool:
        """Refresh this node's heartbeat and the TTL of the presence it holds; return whether
        the heartbeat had expired (or Redis was empty). Notes a change of generation."""
        assert self._redis is not None
        hashes: list[list[str]] = [[] for _ in self._partitions]
        for room, client_id in self._presence:
            hashes[self._keys.partition(room)].append(self._keys.client(room, client_id))
        expired = False
        for partition in self._partitions:
            index = partition.index
            existed, generation = await self._heartbeat_script(
                keys=[
                    self._keys.node(index, self.node_id),
                    self._keys.nodes(index),
                    self._keys.index(index, self.node_id),
                    self._keys.wake(index),
                    self._keys.generation(index),
                ],
                args=[
                    int(self.presence_ttl * 1000),
                    self.node_id,
                    self._node_ttl_ms,
                    self._room_ttl_ms,
                    *sorted(hashes[index]),
                ],
            )
            self._mark_writable()
            if generation != partition.generation:
                partition.generation_unsure = True  # read afresh by _sync_generation
            expired = expired or not existed
        return expired

    async def _run_heartbeat(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            refused: RedisError | None = None
            try:
                try:
                    if await self._heartbeat():
                        self._resync_pending = True
                except self._unreachable:
                    raise
                except RedisError as exc:
                    # Refused (a write under OOM): still keep the rooms alive below (PEXPIRE
                    # is allowed then), so an outage of writes never expires them.
                    refused = exc
                for partition in self._partitions:
                    if partition.generation_unsure:
                        await self._sync_generation(partition)
                # Keeps the rooms this node uses alive, and resets any whose stream is gone.
                await self._check_rooms(poke=True)
                if refused is not None:
                    self._mark_refused(refused)
                    continue
                if self._resync_pending:
                    await self._resync_presence()
                    self._resync_pending = False
                await self._reap_dead_nodes()
            except self._unreachable as exc:
                self._mark_down(exc)
            except BackendUnavailable:
                pass  # a publish of the resync or reaper: already marked down
            except (BackendError, RedisError) as exc:
                self._mark_refused(exc)

    async def _resync_presence(self) -> None:
        """Make Redis hold exactly this node's connections again, after an outage.

        A ``remove_presence`` that failed while Redis was unreachable left a count behind,
        and a heartbeat that expired (or a Redis that lost its data) dropped ours: entries
        Redis has but this node does not are removed (announcing ``leave`` if the client is
        gone everywhere), entries this node has are written back (announcing ``join`` if the
        client was nowhere).
        """
        async with self._presence_resync():
            await self._resync_presence_now()

    async def _resync_presence_now(self) -> None:
        assert self._redis is not None
        held: set[str] = set()
        for partition in range(self._keys.count):
            index = self._keys.index(partition, self.node_id)
            held.update(str(entry) for entry in await self._redis.smembers(index))
        local = {f"{room} {client_id}" for room, client_id in self._presence}
        for entry in sorted(held - local):
            if await self._reap(self.node_id, entry, check_alive=False) == 1:
                room, _, client_id = entry.partition(" ")
                await self.publish(room, "leave", client_id)
        for (room, client_id), count in tuple(self._presence.items()):
            first = await self._restore_presence_script(
                keys=self._presence_keys(room, client_id),
                args=[*self._presence_args(room, client_id), count],
            )
            if first:
                await self.publish(room, "join", client_id)
        # Entries of this node that Redis holds for clients it holds too may count more
        # connections than this node has (an add whose answer was lost): set above.

    async def _reap(self, node: str, entry: str, *, check_alive: bool) -> int:
        room, _, client_id = entry.partition(" ")
        partition = self._keys.partition(room)
        keys = self._presence_keys(room, client_id)[:2]
        keys += [self._keys.index(partition, node), self._keys.node(partition, node)]
        result = await self._reap_presence_script(
            keys=keys,
            args=[
                node,
                client_id,
                entry,
                self._keys.node_prefix(partition),
                "1" if check_alive else "0",
            ],
        )
        return int(result)

    async def _reap_dead_nodes(self) -> None:
        """Remove what dead nodes held in presence and announce their clients' leaves.

        Each entry is removed by one node only, so each leave is announced once; the node
        that then removes the dead node from a partition's nodes set counts it as reaped
        (once per partition that knew it).
        """
        for partition in range(self._keys.count):
            await self._reap_partition(partition)

    async def _reap_partition(self, partition: int) -> None:
        assert self._redis is not None
        nodes_key = self._keys.nodes(partition)
        nodes = sorted(str(node) for node in await self._redis.smembers(nodes_key))
        others = [node for node in nodes if node != self.node_id]
        if not others:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for node in others:
                pipe.exists(self._keys.node(partition, node))
            flags = await pipe.execute()
        for node, alive in zip(others, flags, strict=True):
            if alive:
                continue
            index = self._keys.index(partition, node)
            entries = sorted(str(entry) for entry in await self._redis.smembers(index))
            leaves = 0
            for entry in entries:
                result = await self._reap(node, entry, check_alive=True)
                if result == -1:
                    break  # it beat again: alive after all
                if result == 1:
                    room, _, client_id = entry.partition(" ")
                    await self.publish(room, "leave", client_id)
                    leaves += 1
            else:
                if await self._redis.srem(nodes_key, node):
                    self._reaped_nodes += 1
                    await self._redis.delete(index, self._keys.node(partition, node, "wake"))
                    logger.log(
                        logging.WARNING if entries else logging.INFO,
                        "node %s stopped beating: removed its presence (%d leaves announced)",
                        node,
                        leaves,
                    )
