"""A test-only worker: the stub plus admin commands that print raw output, grow memory and
list the modules it has imported, and a health() that raises when settings.health_raises is set.

The daemon under test gets tests/helpers on PYTHONPATH, so ``probe_worker:ProbeWorker`` is a
valid entrypoint there; nothing in the product imports this.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from workers.stub import StubWorker


class ProbeWorker(StubWorker):
    ballast: list[bytearray]

    async def start(self) -> None:
        self.ballast = []
        await super().start()
        # Plain output, not a JSON log line: the supervisor must still capture and label it.
        print(f"probe says hello from {os.getpid()}", flush=True)
        print(f"probe complains on stderr from {os.getpid()}", file=sys.stderr, flush=True)

    def health(self) -> tuple[str, str]:
        if self.settings.get("health_raises"):
            raise RuntimeError("probe health exploded")
        return super().health()

    async def admin(self, command: str, args: dict[str, Any]) -> Any:
        if command == "grow":
            mb = int(args.get("mb", 100))
            block = bytearray(mb << 20)
            for i in range(0, len(block), 4096):  # touch every page: resident, not just mapped
                block[i] = 1
            self.ballast.append(block)
            return {"grown_mb": mb}
        if command == "print":  # text=..., or size=N for a generated line of N letters
            size = int(args.get("size", 0))
            text = "".join(chr(97 + i % 26) for i in range(size)) if size else args.get("text", "")
            print(text, flush=True)
            return {"printed": len(text)}
        if command == "modules":  # the imported modules whose name starts with prefix=...
            return sorted(m for m in sys.modules if m.startswith(args.get("prefix", "")))
        return await super().admin(command, args)
