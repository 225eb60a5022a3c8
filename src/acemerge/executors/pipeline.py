"""A one-item-ahead pipeline stage: a function applied in a thread, one item ahead of its
consumer, so that consecutive stages overlap while each holds at most two items."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

_END = object()


class Ahead(Generic[In, Out]):
    """Iterates ``fn(item)`` for every item, computed in a thread: the next result is
    computed while the consumer works on the current one, and no further (the thread takes
    the next item only once the consumer has taken the previous result).

    An exception raised by ``fn`` or by the items is raised in the consumer, in order.
    ``close()`` stops the thread (after the item it is computing) and joins it.
    """

    def __init__(self, fn: Callable[[In], Out], items: Iterable[In], name: str) -> None:
        self._slot = threading.Semaphore(1)  # one result produced and not yet taken
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(fn, items), name=name,
                                        daemon=True)
        self._thread.start()

    def _produce(self, fn: Callable[[In], Out], items: Iterable[In]) -> None:
        try:
            remaining = iter(items)
            while self._wait_for_slot():
                item = next(remaining, _END)
                if item is _END:
                    return
                result = fn(item)  # type: ignore[arg-type]
                item = None  # hold nothing while waiting
                self._results.put((True, result))
                result = None
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._results.put((False, exc))
        finally:
            self._results.put((True, _END))

    def _wait_for_slot(self) -> bool:
        """Wait until the consumer has taken the last result; False once stopped."""
        while not self._slot.acquire(timeout=0.05):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def __iter__(self) -> Iterator[Out]:
        while True:
            ok, value = self._results.get()
            if value is _END:
                return
            self._slot.release()
            if not ok:
                raise value
            yield value
            value = None  # hold nothing while waiting for the next result

    def close(self) -> None:
        """Stop producing and wait for the thread."""
        self._stop.set()
        self._thread.join()
