"""The uvicorn server the daemon runs its HTTP endpoints with (control API, gateway, metrics)."""

from __future__ import annotations

import asyncio
from contextlib import nullcontext
from typing import Any

import uvicorn


class DaemonServer(uvicorn.Server):
    """uvicorn, fitted to a long-running daemon.

    - No signal capture: the daemon owns SIGTERM/SIGINT and cancels its servers itself.
    - A 1 s housekeeping tick instead of uvicorn's 0.1 s: the tick only refreshes the Date header
      (once a second anyway) and checks for shutdown, and ten wake-ups a second per server were the
      largest part of an idle daemon's CPU. Shutdown is noticed within a second.
    """

    def capture_signals(self) -> Any:
        return nullcontext()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes headers when counter % 10 == 0
            await asyncio.sleep(1.0)
