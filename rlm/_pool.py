"""One thread pool per process for the blocking work of every call tree (cells, REPL starts).

A pool per `completion()` started its threads anew each time: on two busy cores a thread
takes 2-3 ms to start (it waits for the GIL), which put ~25 ms in front of a batch of child
RLMs. Threads here outlive a tree and serve the next one. A tree submits through its own
`TreePool`, which can cancel what the tree queued without touching other trees' work.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any, Callable

__all__ = ["TreePool"]

# Cells block a thread each, and a cell waiting on rlm_query holds its thread while its
# children's cells run: the pool must be far larger than any tree's concurrency. Threads are
# made only when no idle one is free.
_MAX_THREADS = 1024

_shared: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _shared
    with _lock:
        if _shared is None or _shared[0] != os.getpid():  # a forked process has none of the threads
            _shared = (os.getpid(), concurrent.futures.ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="rlm"))
        return _shared[1]


class TreePool(concurrent.futures.Executor):
    """One tree's share of the process's pool: `shutdown(cancel_futures=True)` cancels the
    tree's work still queued; running work finishes (its REPL is closed by then)."""

    def __init__(self) -> None:
        self._pending: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future = self.submit_unless_shut(fn, *args, **kwargs)
        if future is None:
            raise RuntimeError("this call tree has ended")
        return future

    def submit_unless_shut(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future | None:
        """`submit`, or None once `shutdown` was called (the caller then does the work itself)."""
        with self._lock:
            if self._closed:
                return None
            future = _pool().submit(fn, *args, **kwargs)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            concurrent.futures.wait(pending)

    def _done(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._pending.discard(future)
