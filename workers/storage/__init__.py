"""The storage service: owns the embedded store (LevelDB under the data directory).

For now it opens the store and reports on it; the storage API and the event log come with the
storage issue.
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from ipc.config import StorageSection
from workers.runtime import Worker


class StorageWorker(Worker):
    db: Any = None

    @property
    def path(self) -> str:
        section = self.context.section
        assert isinstance(section, StorageSection)
        return section.path or os.path.join(self.context.data_dir, "leveldb")

    async def start(self) -> None:
        import plyvel

        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        # Opening may recover a log after a crash: keep the event loop (and heartbeats) going.
        self.db = await asyncio.to_thread(plyvel.DB, self.path, create_if_missing=True)
        self.log.info("LevelDB open at %s", self.path)

    async def stop(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def status(self) -> dict[str, Any]:
        return {"backend": "leveldb", "path": self.path, "open": self.db is not None}
