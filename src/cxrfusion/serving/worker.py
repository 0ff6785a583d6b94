"""The model's one worker thread, behind a bounded queue: full means "come back later", not "wait".

PyTorch modules are not safe to call from several threads at once (and gain nothing from it on
one device), so every model call runs on a single thread, which gathers concurrent requests into
batches (`batcher.Batcher`); decoding happens before, elsewhere (`decoder.DecodePool`). At most
`capacity` requests are held (decoding, waiting or running); the next one is refused at once with
a suggested wait, so a request's latency is bounded by `capacity` model calls (and decodes) and the
service never piles up work.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from cxrfusion.serving.batcher import Batcher

A = TypeVar("A")
T = TypeVar("T")
# Weight of the newest call in the running mean of time per request (a smooth, recent estimate).
_SMOOTHING = 0.2
_MAX_RETRY_AFTER_S = 60


class Busy(Exception):
    """The queue is full; `retry_after` is a suggested wait in whole seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the model queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ModelWorker(Generic[A, T]):
    """Runs `fn` on batches of requests on one thread, holding at most `capacity` requests.

    Args:
        fn: the results of a batch of prepared requests, in order (`batcher.Batcher`); a batch
            that fails is run again request by request, so a failure is its own request's.
        capacity: requests held at once, preparing, waiting or running (at least 1).
        max_batch: most requests per call of `fn` (1: one call per request).
        max_wait_s: longest the first request of a batch waits for others to join.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[A]], Sequence[T]],
        capacity: int,
        max_batch: int = 1,
        max_wait_s: float = 0.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._fn = fn
        self._batcher: Batcher[A, T] = Batcher(self._timed, max_batch, max_wait_s)
        self._lock = threading.Lock()
        self._held = 0
        self._mean_s = 1.0

    @property
    def held(self) -> int:
        """Requests preparing, waiting or running now."""
        return self._held

    async def run(self, prepare: Callable[[], Awaitable[A]]) -> T:
        """Hold a place, await `prepare()` off the model thread, then run the result through `fn`.

        The place is held from the start of `prepare` (decoding an upload) to the end of the
        batch that holds the request, so `capacity` bounds the decoding as well as the model
        calls.

        Raises:
            Busy: when `capacity` requests are already held.
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
        future = self._batcher.submit(prepared)
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Drop waiting requests and stop the thread after the running batch."""
        self._batcher.close()

    def _timed(self, batch: Sequence[A]) -> Sequence[T]:
        start = time.perf_counter()
        try:
            return self._fn(batch)
        finally:
            per_request = (time.perf_counter() - start) / len(batch)
            with self._lock:
                self._mean_s += _SMOOTHING * (per_request - self._mean_s)

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self._held -= 1

    def _retry_after(self) -> int:
        """Seconds until the queue has likely drained: held requests times the mean time each."""
        return int(min(max(math.ceil(self._held * self._mean_s), 1), _MAX_RETRY_AFTER_S))
