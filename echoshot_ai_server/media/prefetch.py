"""Run an iterator in a thread a few items ahead, so that decoding overlaps the model's work."""

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetch(Iterator[T]):
    """Iterates `iterable` in a background thread, at most `depth` items ahead of the consumer.

    An exception in the thread is raised in the consumer. Use as a context manager: leaving it
    stops the thread and waits for it, so the iterable's resources can be released safely after.
    """

    def __init__(self, iterable: Iterable[T], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(iterable),), name="prefetch", daemon=True)
        self._thread.start()

    def _fill(self, iterator: Iterator[T]) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer
            self._put(_Failure(exc))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # stay exhausted
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def __enter__(self) -> "Prefetch[T]":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
