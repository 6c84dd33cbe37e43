"""The prefetching thread: order kept, errors surfaced, nothing left running."""

import threading
import time

import pytest

from echoshot_ai_server.media.prefetch import Prefetch


def test_items_arrive_in_order():
    with Prefetch(range(50), depth=3) as items:
        assert list(items) == list(range(50))


def test_an_error_in_the_thread_is_raised_in_the_consumer():
    def broken():
        yield 1
        raise ValueError("decoder broke")

    with Prefetch(broken()) as items:
        assert next(items) == 1
        with pytest.raises(ValueError, match="decoder broke"):
            next(items)


def test_leaving_early_stops_the_thread():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    before = threading.active_count()
    with Prefetch(endless(), depth=2) as items:
        next(items)
    time.sleep(0.05)
    assert threading.active_count() == before
    assert len(produced) <= 5  # it never ran far ahead
