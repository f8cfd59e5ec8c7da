"""The processor's checkpoint: its whole state and the log positions it reflects, saved together.

A restarted processor loads the newest complete checkpoint and reads the event log on from the
positions in it, so every event is counted exactly once in the windows: the events after the
positions are not in the state, those before are. (Events re-delivered beyond that, e.g. by a
Kafka rebalance, are dropped by the deduplicator, whose ids are part of the state.)

The state can outgrow one storage request (1 MiB), so it is compressed and written in chunks
under a new generation (``processor.ckpt.<gen>.<i>`` in the ``state`` namespace), then the
manifest ``processor.ckpt`` is switched to that generation in one put, and only then are the
previous generation's chunks deleted. A crash at any point leaves the previous manifest and
all of its chunks intact; chunks a crash leaves behind are collected at the next load.
"""
from __future__ import annotations

import logging
import zlib

import msgspec

from ipc import storage as s
from workers.storage_client import StorageClient

log = logging.getLogger("workers.processor.checkpoint")

NS = "state"
MANIFEST_KEY = b"processor.ckpt"
CHUNK_BYTES = 400 * 1024  # under the 512 KiB value limit, one per 1 MiB request
FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be read back: missing chunks, or a format not known here."""


class Checkpoint(msgspec.Struct):
    positions: dict[int, int]  # event-log partition -> next offset to read
    feedback_position: int     # next offset of the feedback log
    state: bytes               # the processor core's state (ProcessorCore.state_to_bytes)


class _Manifest(msgspec.Struct):
    version: int
    generation: int
    chunks: int
    size: int
    positions: dict[int, int]
    feedback_position: int


def _chunk_key(generation: int, index: int) -> bytes:
    return b"processor.ckpt.%d.%d" % (generation, index)


class CheckpointStore:
    def __init__(self, client: StorageClient):
        self.client = client
        self.generation = 0
        self.chunks = 0  # of the current generation, deleted once the next one is in place
        self.saved_bytes = 0  # compressed size of the last checkpoint, for status

    async def load(self) -> Checkpoint | None:
        raw = await self.client.get(NS, MANIFEST_KEY)
        if raw is None:
            return None
        try:
            manifest = msgspec.msgpack.decode(raw, type=_Manifest)
        except msgspec.DecodeError as exc:
            raise CheckpointError(f"checkpoint manifest unreadable: {exc}") from exc
        if manifest.version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format {manifest.version}; this version reads "
                                  f"{FORMAT_VERSION}")
        parts = []
        for i in range(manifest.chunks):
            chunk = await self.client.get(NS, _chunk_key(manifest.generation, i))
            if chunk is None:
                raise CheckpointError(f"checkpoint generation {manifest.generation}: chunk {i} "
                                      f"of {manifest.chunks} is missing")
            parts.append(chunk)
        compressed = b"".join(parts)
        if len(compressed) != manifest.size:
            raise CheckpointError(f"checkpoint generation {manifest.generation}: "
                                  f"{len(compressed)} bytes, manifest says {manifest.size}")
        self.generation, self.saved_bytes = manifest.generation, manifest.size
        self.chunks = manifest.chunks
        await self._collect_garbage()
        return Checkpoint(manifest.positions, manifest.feedback_position,
                          zlib.decompress(compressed))

    async def save(self, checkpoint: Checkpoint) -> None:
        compressed = zlib.compress(checkpoint.state, 1)
        chunks = [compressed[i:i + CHUNK_BYTES]
                  for i in range(0, len(compressed), CHUNK_BYTES)] or [b""]
        generation = self.generation + 1
        for i, chunk in enumerate(chunks):
            await self.client.put(NS, _chunk_key(generation, i), chunk)
        manifest = _Manifest(FORMAT_VERSION, generation, len(chunks), len(compressed),
                             checkpoint.positions, checkpoint.feedback_position)
        await self.client.put(NS, MANIFEST_KEY, msgspec.msgpack.encode(manifest))
        previous = [_chunk_key(self.generation, i) for i in range(self.chunks)]
        self.generation, self.chunks = generation, len(chunks)
        self.saved_bytes = len(compressed)
        if previous:
            try:
                await self.client.call(s.Batch(ops=[s.Delete(ns=NS, key=k) for k in previous]))
            except s.StorageFailure as exc:  # garbage only: the next load collects it
                log.warning("checkpoint generation %d not deleted: %s", generation - 1, exc)

    async def _collect_garbage(self) -> None:
        """At load: drop the chunks of every other generation than the current one, which a
        crash (between writing chunks and the manifest) or a failed delete left behind."""
        keys = []
        keep = _chunk_key(self.generation, 0).rsplit(b".", 1)[0] + b"."
        cursor = None
        try:
            while True:
                page = await self.client.call(s.Scan(ns=NS, prefix=b"processor.ckpt.",
                                                     limit=1000, cursor=cursor))
                keys += [r.key for r in page.records if not r.key.startswith(keep)]
                cursor = page.next_cursor
                if cursor is None:
                    break
            if keys:
                await self.client.call(s.Batch(ops=[s.Delete(ns=NS, key=k) for k in keys]))
        except s.StorageFailure as exc:
            log.warning("old checkpoint chunks not deleted (%d found): %s", len(keys), exc)
