"""The render threads: queued work runs by turn, then in the order it came; the rest is what an
executor promises (results, exceptions, cancels, shutdown)."""

from __future__ import annotations

import contextvars
import threading
from concurrent.futures import CancelledError, Future

import pytest

from dreamserve.render_threads import RenderThreads, take_turn


def submit_in_turn(pool: RenderThreads, turn: int, fn, *args) -> Future:
    """`fn` submitted from a task whose turn is `turn`."""

    def submit() -> Future:
        take_turn(turn)
        return pool.submit(fn, *args)

    return contextvars.copy_context().run(submit)


def blocked(pool: RenderThreads) -> threading.Event:
    """An event that the pool's one thread waits on until the test sets it."""
    gate, running = threading.Event(), threading.Event()
    pool.submit(lambda: (running.set(), gate.wait()))
    assert running.wait(10)
    return gate


def test_queued_work_runs_by_turn_then_in_order_and_work_of_no_job_first() -> None:
    pool = RenderThreads(1)
    gate = blocked(pool)
    ran: list[str] = []
    for turn, name in [(3, "c"), (1, "a1"), (2, "b"), (1, "a2")]:
        submit_in_turn(pool, turn, ran.append, name)
    pool.submit(ran.append, "no job")
    gate.set()
    pool.shutdown(wait=True)
    assert ran == ["no job", "a1", "a2", "b", "c"]


def test_threads_start_as_work_comes_up_to_the_most() -> None:
    pool = RenderThreads(2)
    both = threading.Barrier(2, timeout=10)  # passed only by two threads at once

    def work(meet: bool) -> str:
        if meet:
            both.wait()
        return threading.current_thread().name

    futures = [pool.submit(work, i < 2) for i in range(5)]
    assert {future.result(10) for future in futures} == {
        "dreamserve-render_0",
        "dreamserve-render_1",
    }
    pool.shutdown()


def test_results_and_exceptions_reach_the_future() -> None:
    pool = RenderThreads(1)
    assert pool.submit(pow, 2, 10).result(10) == 1024
    with pytest.raises(ZeroDivisionError):
        pool.submit(lambda: 1 / 0).result(10)
    pool.shutdown()


def test_cancelled_work_does_not_run() -> None:
    pool = RenderThreads(1)
    gate = blocked(pool)
    ran: list[str] = []
    future = pool.submit(ran.append, "cancelled")
    assert future.cancel()
    pool.submit(ran.append, "kept")
    gate.set()
    pool.shutdown(wait=True)
    assert ran == ["kept"]


def test_shutdown_runs_the_queued_work_or_cancels_it() -> None:
    ran: list[str] = []
    for cancel_futures, expected in [(False, ["queued"]), (True, [])]:
        pool = RenderThreads(1)
        gate = blocked(pool)
        future = pool.submit(ran.append, "queued")
        threading.Timer(0.05, gate.set).start()
        pool.shutdown(wait=True, cancel_futures=cancel_futures)
        assert ran == expected
        if cancel_futures:
            with pytest.raises(CancelledError):
                future.result(0)
        ran.clear()
        with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
            pool.submit(ran.append, "late")
