"""Cold forecasts first: bulk bodies wait while requests of this process are computing cold forecasts.

Everything a worker process does in Python shares one GIL. A cold forecast (features of every cell, then the
booster) is mostly GIL-bound numpy work, and so is a bulk body: slicing a city-wide ranking into megabytes of
JSON, building every cell of ``/v1/forecast``, drawing a PNG, hashing the audit row, writing to the socket. Run
side by side, each slows the other by its own CPU time. A planner waiting for the next shift's map should not wait
for someone else's city-wide export, so a bulk response first waits until no request of its process is computing a
cold forecast (from the miss until that request's response is made), for at most ``BULK_MAX_WAIT`` seconds: under
a steady stream of cold forecasts it still goes ahead.

What this does not do: a bulk body already past its turn still shares the GIL with a cold forecast that starts
after it; the bodies that waited all go ahead together; a new champion's background warm-up is not waited for;
worker processes do not coordinate (each has its own GIL, but they share the machine's cores).

The wait is asynchronous (it holds no thread) and is measured: ``hotspots_bulk_wait_seconds``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

BULK_MAX_WAIT = 1.0  # seconds a bulk body waits at most for cold forecasts to finish
SMALL_BODY_BYTES = 2**20  # a bulk body already made and smaller is sent at once: its write costs well under 1 ms


class ColdForecasts:
    """The requests of this process computing a cold forecast, and the bulk bodies waiting for there to be none
    (woken when that happens, not polling: a polling loop would keep taking the GIL from the forecasts)."""

    def __init__(self, max_wait: float = BULK_MAX_WAIT):
        self.max_wait = max_wait
        self._under_way = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()

    @property
    def under_way(self) -> int:
        return self._under_way

    @contextmanager
    def request(self) -> Iterator[ColdShare]:
        """A request's share, released when the block ends however it ends (answer, error, disconnect)."""
        share = ColdShare(self._add)
        try:
            yield share
        finally:
            share.release()

    def _add(self, delta: int) -> None:
        with self._lock:
            self._under_way += delta
            woken, self._waiters = (self._waiters, []) if self._under_way == 0 else ([], self._waiters)
        for waiter in woken:
            try:  # each on its own loop's thread
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # that loop is closed: nobody waits on it any more
                pass

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
                pass
            finally:  # timed out or cancelled: not left for a later wake-up
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        return time.perf_counter() - started


class ColdShare:
    """One request's part in the count: from the moment its forecast is found missing (``missed``) until the
    request's response is made, so that bulk bodies also wait for its explanations, body and audit entry; or until
    the request turns out to be bulk work itself (``release``), which must not wait for its own forecast."""

    def __init__(self, add: Callable[[int], None]):
        self._add, self._counted = add, False

    def missed(self) -> None:
        if not self._counted:
            self._counted = True
            self._add(1)

    def release(self) -> None:
        if self._counted:
            self._counted = False
            self._add(-1)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
