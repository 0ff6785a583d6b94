"""The model's one worker thread, behind a bounded queue: full means "come back later", not "wait".

PyTorch modules are not safe to call from several threads at once (and gain nothing from it on
one device), so every model call runs on a single thread; decoding happens before, elsewhere
(`decoder.DecodePool`). At most `capacity` requests are held (decoding, running or waiting); the
next one is refused at once with a suggested wait, so a request's latency is bounded by
`capacity` model calls (and decodes) and the service never piles up work.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

A = TypeVar("A")
T = TypeVar("T")
# Weight of the newest call in the running mean of call time (a smooth, recent estimate).
_SMOOTHING = 0.2
_MAX_RETRY_AFTER_S = 60


class Busy(Exception):
    """The queue is full; `retry_after` is a suggested wait in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the model queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ModelWorker:
    """Runs callables on one thread, holding at most `capacity` of them (with their preparation).

    Args:
        capacity: requests held at once, preparing, running or waiting (at least 1).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxrfusion-model")
        self._lock = threading.Lock()
        self._held = 0
        self._mean_s = 1.0

    @property
    def held(self) -> int:
        """Requests preparing, running or waiting now."""
        return self._held

    async def run(self, fn: Callable[[A], T], prepare: Callable[[], Awaitable[A]]) -> T:
        """Hold a place, await `prepare()` off the model thread, then run `fn(prepared)` on it.

        The place is held from the start of `prepare` (decoding an upload) to the end of `fn`, so
        `capacity` bounds the decoding as well as the model calls.

        Raises:
            Busy: when `capacity` calls are already held.
        """
        with self._lock:
            if self._held >= self.capacity:
                raise Busy(self._retry_after())
            self._held += 1
        try:
            prepared = await prepare()
        except BaseException:
            self._release()
            raise
        # The slot is freed when the call really ends (or is cancelled before it starts), even
        # if the client has gone: the queue counts the model's work, not open connections.
        future: Future[T] = self._executor.submit(self._timed, fn, prepared)
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Drop waiting calls and stop the thread after the running one."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _timed(self, fn: Callable[[A], T], prepared: A) -> T:
        start = time.perf_counter()
        try:
            return fn(prepared)
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._mean_s += _SMOOTHING * (elapsed - self._mean_s)

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self._held -= 1

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained: held calls times the mean call time."""
        return int(min(max(math.ceil(self._held * self._mean_s), 1), _MAX_RETRY_AFTER_S))
