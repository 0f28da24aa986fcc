"""serve/engine/threads.py: setup and adapter loads run on threads that exit, bounded, in order, errors delivered."""

from __future__ import annotations

import threading
import time

import pytest

from serve.engine.threads import OneShotThreads, run_on_fresh_thread


def test_run_on_fresh_thread_returns_or_raises_in_the_caller():
    me = threading.get_ident()
    assert run_on_fresh_thread(lambda a, b=0: (a + b, threading.get_ident()), 1, b=2)[0] == 3
    assert run_on_fresh_thread(threading.get_ident) != me
    with pytest.raises(KeyError, match="boom"):
        run_on_fresh_thread(lambda: {}["boom"])


def test_one_shot_threads_bound_concurrency_and_never_reuse_a_thread():
    pool = OneShotThreads(2, "test-load")
    lock, running, peak, idents = threading.Lock(), [0], [0], []

    def job(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            idents.append(threading.get_ident())
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if i == 3:
            raise ValueError("job 3 failed")
        return i * 10

    futures = [pool.submit(job, i) for i in range(6)]
    assert [f.result(timeout=10) for f in futures if not f.exception(timeout=10)] == [0, 10, 20, 40, 50]
    assert isinstance(futures[3].exception(), ValueError)
    assert peak[0] == 2
    # every job had a thread of its own: once a thread exits its OpenMP team is freed (the reason for the class)
    assert all(not t.is_alive() for t in threading.enumerate() if t.name == "test-load" and t.ident in idents[:-2])
    pool.shutdown(wait=True)
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(job, 9)


def test_shutdown_cancels_queued_jobs_when_asked():
    pool = OneShotThreads(1, "test-cancel")
    gate = threading.Event()
    first = pool.submit(gate.wait, 5)
    queued = pool.submit(lambda: "never")
    pool_shutdown = threading.Thread(target=pool.shutdown, kwargs={"wait": True, "cancel_futures": True})
    pool_shutdown.start()
    time.sleep(0.05)
    gate.set()
    pool_shutdown.join(timeout=10)
    assert first.result(timeout=5) is True and queued.cancelled()
