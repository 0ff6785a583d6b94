"""Dynamic batching on the model's one thread: concurrent requests share one model call.

The thread takes the oldest waiting item, then gathers more until it holds `max_batch` of them or
`max_wait_s` have passed since it took the first; items that arrived meanwhile join without
further waiting, so a busy model batches by itself even with `max_wait_s = 0`. A batch whose call
fails is run again item by item, so that a failure costs only the request that caused it.
`max_batch = 1` runs every item alone, in arrival order, as a one-thread executor would.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

A = TypeVar("A")
T = TypeVar("T")


class Batcher(Generic[A, T]):
    """Runs `fn` on batches of the submitted items, on one thread of its own.

    Args:
        fn: the results of a batch of items, in their order; called on the batcher's thread only
            (so a model that is not thread-safe may live in it).
        max_batch: most items per call (at least 1; 1 runs each item alone).
        max_wait_s: longest the first item of a batch waits for others to join (at least 0):
            latency given up for fewer, larger calls when requests arrive close together.
    """

    def __init__(
        self, fn: Callable[[Sequence[A]], Sequence[T]], max_batch: int, max_wait_s: float
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be at least 0, got {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._fn = fn
        self._queue: queue.SimpleQueue[tuple[A, Future[T]] | None] = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="cxrfusion-model", daemon=True)
        self._thread.start()

    def submit(self, item: A) -> Future[T]:
        """Queue `item`; the future gets its result, or its own exception.

        A future cancelled before its batch starts is left out of the batch.
        """
        future: Future[T] = Future()
        with self._lock:  # with close(): nothing is queued behind the closing mark
            if self._closed:
                future.cancel()
            else:
                self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Cancel the waiting items and stop the thread after the running batch."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _loop(self) -> None:
        closing = False
        while not closing:
            batch, closing = self._gather()
            if batch:
                self._run(batch)
        while True:  # closed: cancel what is left
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                return
            if entry is not None:
                entry[1].cancel()

    def _gather(self) -> tuple[list[tuple[A, Future[T]]], bool]:
        """The next batch, its futures marked running, and whether the batcher was closed."""
        batch: list[tuple[A, Future[T]]] = []
        deadline: float | None = None
        while len(batch) < self.max_batch:
            # Nothing gathered yet: wait for the first item however long; then until the deadline.
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                entry = self._queue.get(timeout=timeout)
            except queue.Empty:
                break
            if entry is None or self._closed:
                if entry is not None:
                    entry[1].cancel()
                return batch, True
            if entry[1].set_running_or_notify_cancel():
                batch.append(entry)
                if deadline is None:
                    deadline = time.monotonic() + self.max_wait_s
        return batch, False

    def _run(self, batch: list[tuple[A, Future[T]]]) -> None:
        try:
            results = list(self._fn([item for item, _ in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except Exception as error:
            if len(batch) == 1:
                batch[0][1].set_exception(error)
                return
            log.warning(
                "a batch of %d failed (%s); running its requests one by one",
                len(batch),
                type(error).__name__,
            )
            for entry in batch:
                self._run([entry])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
