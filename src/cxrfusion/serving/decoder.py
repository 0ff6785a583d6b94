"""Decode uploads in child processes under a time limit, never on the model thread.

A crafted file can keep a decoder busy for minutes or crash it; either must cost its own request
only. Each decode runs in one of a few child processes and gets `timeout_s`: a child that
overruns or dies is killed and replaced, and the request gets a `CxrError`. Threads would not do:
one stuck in a C decoder cannot be stopped, and would keep its core and memory until it returned.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from cxrfusion.data.imageio import Radiograph, read_radiograph, resize_square
from cxrfusion.errors import CxrError

log = logging.getLogger(__name__)
# Spawned, not forked: the server holds threads (uvicorn's, the model's, torch's) that a fork
# would copy in whatever state they were.
_CONTEXT = multiprocessing.get_context("spawn")
# Seconds a new child may take to import its decoders and take its first request.
_START_TIMEOUT_S = 120


class DecodePool:
    """Child processes that decode uploads to `size` x `size` pixels, each within `timeout_s`.

    Args:
        workers: child processes, so decodes running at once (at least 1).
        timeout_s: seconds one decode may take before its child is killed and replaced.
        size: side of the returned image: the run's cache size, which `Classifier.prepare`
            brings to the model's input exactly as it would the full-size decode.
    """

    def __init__(self, workers: int, timeout_s: float, size: int) -> None:
        self.timeout_s = timeout_s
        self._size = size
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(_Child(size))
        # One thread per child waits for it, so that the event loop never does.
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="cxrfusion-decode")

    async def decode(self, name: str, data: bytes) -> Radiograph:
        """The upload decoded (`imageio.read_radiograph`) and squashed to `size` x `size`.

        Raises:
            CxrError: the file cannot be decoded, took longer than `timeout_s`, or killed the
                decoder.
        """
        return await asyncio.wrap_future(self._threads.submit(self._decode, name, data))

    def close(self) -> None:
        """Drop waiting decodes and stop the idle children (a busy one ends with this process)."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        while not self._idle.empty():
            self._idle.get().kill()

    def _decode(self, name: str, data: bytes) -> Radiograph:
        child = self._idle.get()  # as many threads as children: never waits
        try:
            return child.decode(name, data, self.timeout_s)
        except TimeoutError:
            child = self._replace(child)
            raise CxrError(
                f"{name}: decoding took longer than {self.timeout_s:g} s; refused"
            ) from None
        except (EOFError, OSError):  # the child died: a decoder crash, or killed for memory
            child = self._replace(child)
            raise CxrError(f"{name}: the image decoder failed on this file") from None
        finally:
            self._idle.put(child)

    def _replace(self, child: _Child) -> _Child:
        log.warning("decoder process %d stopped or overran; starting another", child.pid)
        child.kill()
        return _Child(self._size)


class _Child:
    """One decoding process and the parent's end of its pipe."""

    def __init__(self, size: int) -> None:
        self._conn, remote = _CONTEXT.Pipe()
        self._process = _CONTEXT.Process(
            target=_serve, args=(remote, size), name="cxrfusion-decoder", daemon=True
        )
        self._process.start()
        remote.close()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def decode(self, name: str, data: bytes, timeout_s: float) -> Radiograph:
        self._conn.send((name, data))
        # The child acknowledges the request before decoding: a new child first imports its
        # decoders (seconds on a busy machine), which the time limit must not count.
        self._receive(_START_TIMEOUT_S)
        result = self._receive(timeout_s)
        if isinstance(result, Exception):
            raise result
        return result

    def _receive(self, timeout_s: float) -> object:
        if not self._conn.poll(timeout_s):
            raise TimeoutError
        return self._conn.recv()

    def kill(self) -> None:
        self._process.kill()
        self._process.join()
        self._conn.close()


def _serve(conn: Connection, size: int) -> None:
    """A child's loop: decode each (name, data) received; send back a Radiograph or the error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    while True:
        try:
            name, data = conn.recv()
        except EOFError:  # the parent has gone
            return
        conn.send(None)
        try:
            decoded = read_radiograph(data, name)
            result: object = Radiograph(resize_square(decoded.pixels, size), decoded.warning)
        except CxrError as error:
            result = error
        except Exception:  # a bug: the parent logs its traceback with the 500 answer
            result = RuntimeError(traceback.format_exc())
        conn.send(result)
