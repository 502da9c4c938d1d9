"""The render threads: the pool that runs the blocking work of jobs (decoding references,
rendering, encoding), the work of the job that started first going first.

A plain pool runs work in the order it is submitted. In a burst, every job's renders are queued
before the first job's encodes, so every job holds its rendered images until the whole burst
has rendered (bench/burst.py). Here the work a job submits carries the job's turn (`take_turn`,
which the runner calls once the job holds its share of the render-memory budget), and a free
thread takes the queued work of the earliest turn: a job's encodes pass the renders of the jobs
after it, so its images are stored, and their memory freed, as soon as they are made. Work
submitted outside a job (no turn) goes before any job's.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_TURN: ContextVar[int] = ContextVar("dreamserve_render_turn", default=0)


def take_turn(turn: int) -> None:
    """The work the current task, and the tasks it starts from now on, submit to the render
    threads runs in `turn`: after the work of lower turns, before the work of higher ones."""
    _TURN.set(turn)


_Work = tuple[int, int, Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class RenderThreads(Executor):
    """At most `max_workers` threads, started as work comes; queued work runs by turn, then in
    the order it was submitted."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "dreamserve-render") -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._queue: list[_Work] = []
        self._order = itertools.count()  # ties of a turn keep their order; futures never compare
        self._lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work that no submission has woken yet
        self._is_shut_down = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._is_shut_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            work: _Work = (_TURN.get(), next(self._order), future, fn, args, kwargs)
            heapq.heappush(self._queue, work)
            if self._idle:
                self._idle -= 1
                self._lock.notify()
            elif len(self._threads) < self._max_workers:
                name = f"{self._prefix}_{len(self._threads)}"
                thread = threading.Thread(target=self._serve, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No work taken after it; the queued work still runs unless `cancel_futures`."""
        with self._lock:
            self._is_shut_down = True
            if cancel_futures:
                for work in self._queue:
                    work[2].cancel()
                self._queue.clear()
            self._idle = 0
            self._lock.notify_all()
            threads = list(self._threads)
        if wait:
            for thread in threads:
                thread.join()

    def _serve(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._is_shut_down:
                    self._idle += 1
                    self._lock.wait()
                if not self._queue:
                    return
                work = heapq.heappop(self._queue)
            _run(work)
            del work  # its result (an image) is not kept alive while the thread waits


def _run(work: _Work) -> None:
    _, _, future, fn, args, kwargs = work
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as error:
        future.set_exception(error)
    else:
        future.set_result(result)
