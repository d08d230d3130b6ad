"""A plain thread beside the compute: read ahead of the consumer (reading, padding) while it computes.

    >>> with ReadAhead(prepare(item) for item in items) as ready:   # prepared up to ``depth`` items ahead
    ...     for job in ready:
    ...         compute(job)

Threads only (no process pools): the refiner runs inside daemonic workers (e.g. dask), which may not have children.
Writing beside the compute uses ``concurrent.futures.ThreadPoolExecutor(max_workers=1)`` directly (one writer
keeps the writes in order).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator

__all__ = ["ReadAhead"]

_END = object()


class ReadAhead:
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.

    Items come out in ``source``'s order; an exception raised by ``source`` is re-raised by the consumer at its
    position (after the items produced before it). ``close()`` (or leaving the ``with`` block) stops the thread once
    it finishes the item it is producing. ``depth`` 0 produces nothing ahead: ``source`` runs in the caller's thread.
    """

    def __init__(self, source: Iterable[Any], depth: int = 2, name: str = "idgbr-read"):
        self._source = iter(source)
        self._depth = int(depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._depth > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=self._depth)
            self._thread = threading.Thread(target=self._run, name=name, daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put((item, None)):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put((None, exc))
            return
        self._put((_END, None))

    def __iter__(self) -> Iterator[Any]:
        if self._thread is None:
            yield from self._source
            return
        while True:
            item, error = self._queue.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
