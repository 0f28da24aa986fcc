"""Which threads run torch's parallel CPU kernels: one long-lived thread (the engine loop), and short-lived
threads for one-off work.

Why: torch's CPU kernels run on OpenMP (libgomp). Every thread that enters a parallel region gets its own team
of worker threads and keeps it until the thread exits. While a process holds more OpenMP threads than it has
cores, libgomp stops spinning between parallel regions (its spin count drops from 300,000 to 100) and every
handoff between kernels sleeps on a futex. A decode step runs hundreds of small kernels, so this costs
a lot: on the 2-core development machine a 32-row flan-t5-small decode took 1.38 s on a second thread that
ran beside the main thread's idle team, against 0.98 s on the only thread with a team (docs/PERFORMANCE.md).

So the engine does its model work on its loop thread only; loading the base and loading adapters from disk
run on threads that exit when done (`run_on_fresh_thread`, `OneShotThreads`), which frees their teams. The
caller's thread (a server's main or event-loop thread, a test) never enters a parallel region for the engine.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def run_on_fresh_thread(fn: Callable[..., T], *args, name: str = "peftserve-setup", **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread that exits afterwards; its result or exception comes back here."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[return-value]


class OneShotThreads:
    """A bounded executor whose every job runs on a thread of its own that exits after the job (see the
    module docstring): at most `max_workers` jobs at once, the rest queued in submission order."""

    def __init__(self, max_workers: int, name: str) -> None:
        self.max_workers, self.name = max_workers, name
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future, Callable, tuple]] = deque()
        self._running = 0
        self._closed = False
        self._idle = threading.Condition(self._lock)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            self._queue.append((future, fn, args))
            self._start_next()
        return future

    def _start_next(self) -> None:
        """Start queued jobs while there is room (lock held)."""
        while self._queue and self._running < self.max_workers:
            job = self._queue.popleft()
            self._running += 1
            threading.Thread(target=self._run, args=job, name=self.name, daemon=True).start()

    def _run(self, future: Future, fn: Callable, args: tuple) -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - delivered through the future
                future.set_exception(e)
        with self._lock:
            self._running -= 1
            self._start_next()
            self._idle.notify_all()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            if cancel_futures:
                while self._queue:
                    self._queue.popleft()[0].cancel()
            if wait:
                while self._running or self._queue:
                    self._idle.wait()
