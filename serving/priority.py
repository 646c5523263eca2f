"""Cold forecasts first: bulk bodies wait while forecasts of this process are being computed.

Everything a worker process does in Python shares one GIL. A cold forecast (features of every cell, then the
booster) is mostly GIL-bound numpy work, and so is a bulk body: slicing a city-wide ranking into megabytes of
JSON, hashing its audit row, writing it to the socket. Run side by side, each slows the other by its own CPU
time. A planner waiting for the next shift's map should not wait for someone else's city-wide export, so a bulk
response (more cells than are explained, or a PNG) first waits until no cold forecast is under way, for at most
``BULK_MAX_WAIT`` seconds: under a steady stream of cold forecasts it still goes ahead.

The wait is asynchronous (it holds no thread) and is measured: ``hotspots_bulk_wait_seconds``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

BULK_MAX_WAIT = 1.0  # seconds a bulk body waits at most for cold forecasts to finish


class ColdForecasts:
    """The number of cold forecasts under way in this process, and the bulk bodies waiting for it to reach zero
    (woken when it does, not polling: a polling loop would keep taking the GIL from the forecasts)."""

    def __init__(self, max_wait: float = BULK_MAX_WAIT):
        self.max_wait = max_wait
        self._under_way = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()

    @property
    def under_way(self) -> int:
        return self._under_way

    def _add(self, delta: int) -> None:
        with self._lock:
            self._under_way += delta
            woken, self._waiters = (self._waiters, []) if self._under_way == 0 else ([], self._waiters)
        for waiter in woken:  # each on its own loop's thread
            waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    @contextmanager
    def computing(self) -> Iterator[None]:
        """One cold forecast under way for as long as the block runs."""
        self._add(1)
        try:
            yield
        finally:
            self._add(-1)

    @contextmanager
    def request(self) -> Iterator[ColdRequest]:
        """A request's share, released when the block ends however it ends (answer, error, disconnect)."""
        share = ColdRequest(self)
        try:
            yield share
        finally:
            share.done()

    async def bulk_turn(self) -> float:
        """Wait (on the event loop, holding no thread) until no cold forecast is under way or ``max_wait`` has
        passed; the seconds waited."""
        started = time.perf_counter()
        while (left := self.max_wait - (time.perf_counter() - started)) > 0:
            waiter = asyncio.get_running_loop().create_future()
            with self._lock:
                if self._under_way == 0:
                    break
                self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        return time.perf_counter() - started


class ColdRequest:
    """One request's cold forecast: under way from the moment the forecast is found missing (``cold``) until the
    request is answered, so that bulk bodies also wait for its explanations, body and audit entry; or until the
    request turns out to be bulk work itself (``done``), which must not wait for its own forecast."""

    def __init__(self, forecasts: ColdForecasts):
        self._forecasts, self._counted = forecasts, False

    def cold(self) -> None:
        if not self._counted:
            self._counted = True
            self._forecasts._add(1)

    def done(self) -> None:
        if self._counted:
            self._counted = False
            self._forecasts._add(-1)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
