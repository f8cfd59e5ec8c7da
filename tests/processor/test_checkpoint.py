"""The processor's checkpoint store against a real storage worker: chunked round trips, the
previous generation deleted at each save, and chunks a crash left behind collected at load."""
from __future__ import annotations

import asyncio
import os

from ipc import storage as s
from workers.processor.checkpoint import CHUNK_BYTES, NS, Checkpoint, CheckpointStore
from workers.storage_client import StorageClient


def test_chunks_round_trip_and_old_generations_are_deleted(make_daemon):
    d = make_daemon(builtins=["storage"]).start()

    async def chunk_keys(client: StorageClient) -> list[bytes]:
        page = await client.call(s.Scan(ns=NS, prefix=b"processor.ckpt.", limit=1000))
        return sorted(r.key for r in page.records)

    async def main() -> None:
        client = StorageClient(d.runtime)
        try:
            store = CheckpointStore(client)
            assert await store.load() is None
            big = os.urandom(3 * CHUNK_BYTES)  # incompressible: four chunks
            await store.save(Checkpoint({0: 10}, 3, big))
            assert len(await chunk_keys(client)) == 4
            await store.save(Checkpoint({0: 20}, 4, b"small state"))
            assert await chunk_keys(client) == [b"processor.ckpt.2.0"]  # generation 1 gone
            # A crash after writing chunks, before switching the manifest, leaves them behind.
            await client.put(NS, b"processor.ckpt.3.0", b"orphan")

            again = CheckpointStore(StorageClient(d.runtime))
            loaded = await again.load()
            assert loaded == Checkpoint({0: 20}, 4, b"small state")
            assert await chunk_keys(client) == [b"processor.ckpt.2.0"]
            await again.save(Checkpoint({0: 30}, 5, big))
            restored = await CheckpointStore(client).load()
            assert restored.state == big and restored.positions == {0: 30}
            assert len(await chunk_keys(client)) == 4
            await again.client.close()
        finally:
            await client.close()
    asyncio.run(main())
