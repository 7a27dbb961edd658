"""Encoding on a thread beside generation: order, errors, and nothing lost on a stop."""

from __future__ import annotations

import threading
import time

import pytest

from liveavatar_core.background_writer import BackgroundWriter


def test_chunks_are_written_in_order_on_another_thread():
    written, threads = [], set()

    def write(chunk):
        time.sleep(0.01)  # slower than the producer: the queue fills and put() waits
        written.append(chunk)
        threads.add(threading.get_ident())

    with BackgroundWriter(write) as background:
        for i in range(10):
            background.put(i)
    assert written == list(range(10))
    assert threading.get_ident() not in threads


def test_a_stopped_producer_still_gets_every_chunk_it_handed_over_written():
    written = []
    with pytest.raises(KeyboardInterrupt):
        with BackgroundWriter(lambda chunk: (time.sleep(0.01), written.append(chunk))) as background:
            for i in range(5):
                background.put(i)
            raise KeyboardInterrupt  # as a Cancel between blocks
    assert written == list(range(5))


def test_a_failing_write_is_raised_in_the_callers_thread_and_stops_writing():
    written = []

    def write(chunk):
        if chunk == 2:
            raise OSError("disk full")
        written.append(chunk)

    with pytest.raises(OSError, match="disk full"):
        with BackgroundWriter(write) as background:
            for i in range(6):
                background.put(i)
                time.sleep(0.01)
    assert written == [0, 1]
