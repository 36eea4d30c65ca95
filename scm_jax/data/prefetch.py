"""A background thread that prepares the next host batches while the device trains.

The batches are exactly :func:`scm_jax.data.arrays.get_batch`'s for consecutive steps, so the
order stays a pure function of (seed, step): starting at ``start_step`` resumes a run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from types import TracebackType

import numpy as np

from scm_jax.data.arrays import Source, get_batch

Batch = tuple[int, np.ndarray, np.ndarray | None]


class _Failure:
    """An exception raised in the producer thread, handed to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class Prefetcher(Iterator[Batch]):
    """Iterate ``(step, x, labels)`` for step = start_step, start_step + 1, ...

    ``x`` float32 ``(batch_size / process_count, *source.shape)`` and labels int32 (or None) are
    ``get_batch(source, step, batch_size, seed, flip=flip, process_index=..., process_count=...)``,
    computed up to ``depth`` steps ahead in a daemon thread. An exception in the thread is
    re-raised by ``next()``. ``stop_step`` (exclusive) ends the iteration; None = never.
    Use as a context manager, or call :meth:`close`, to stop the thread.
    """

    def __init__(
        self,
        source: Source,
        *,
        batch_size: int,
        seed: int,
        start_step: int,
        flip: bool,
        process_index: int = 0,
        process_count: int = 1,
        depth: int = 2,
        stop_step: int | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._source, self._batch_size, self._seed, self._flip = source, batch_size, seed, flip
        self._process = (process_index, process_count)
        self._stop_step = stop_step
        self._queue: queue.Queue[Batch | _Failure | None] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(start_step,), name="prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Batch | _Failure | None) -> bool:
        """Put ``item``, waking up regularly to notice close(); False once closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, step: int) -> None:
        try:
            while self._stop_step is None or step < self._stop_step:
                x, labels = get_batch(
                    self._source,
                    step,
                    self._batch_size,
                    self._seed,
                    flip=self._flip,
                    process_index=self._process[0],
                    process_count=self._process[1],
                )
                if not self._put((step, x, labels)):
                    return
                step += 1
            self._put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it
            self._put(_Failure(e))

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is None or isinstance(item, _Failure):
            self._done = True
            self.close()
            if item is None:
                raise StopIteration
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer thread and wait for it (idempotent)."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._done = True

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
