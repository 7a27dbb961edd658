"""Encoding frames on a thread of its own, so the GPU goes on with the next block meanwhile.

H.264 encoding and the RGB -> YUV conversion take a few hundred milliseconds per 688*368 clip
on the CPU; done in line, the GPU waits for them after every block. PyAV releases the GIL
while it encodes, so a thread is enough. The queue holds at most a couple of chunks: memory
stays flat, and a stopped run still writes every chunk handed over before the stop.
"""

from __future__ import annotations

import queue
import threading

_DONE = object()


class BackgroundWriter:
    """Calls `write(chunk)` on a worker thread for every chunk `put`, in order.

    Use as a context manager: leaving the block waits until every chunk put so far is written;
    an error of the worker is raised in the caller's thread (at the next `put` or on leaving).
    """

    def __init__(self, write, max_pending: int = 2):
        self._write = write
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="liveavatar-video-writer", daemon=True)
        self._thread.start()

    def put(self, chunk) -> None:
        self._raise_worker_error()
        self._queue.put(chunk)

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not _DONE:
            if self._error is None:  # after a failure, drain without writing
                try:
                    self._write(chunk)
                except BaseException as err:  # handed to the caller's thread
                    self._error = err

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Waits for every chunk put so far to be written."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close()
        if exc is None:
            self._raise_worker_error()
