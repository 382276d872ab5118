"""Requests queued per task, one worker that owns the model (chapter 10.3.9: serving many
tasks from one base).

A request names a task combination; the worker takes requests one at a time and switches
the model only *between* requests (never inside one). It keeps serving the active task
while that task has requests waiting - up to ``burst`` in a row when other tasks wait too -
and then switches to the task whose oldest request has waited longest, so switches stay
few without starving a task.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from sparsemerge.errors import SparsemergeError


class Cancelled(Exception):
    """Raised inside a job when its client went away or the server is stopping."""


class Job:
    """One request: ``fn()`` runs on the worker with the model switched to ``task``."""

    _ids = itertools.count()

    def __init__(self, task: str, fn: Callable[["Job"], Any]) -> None:
        self.task, self.fn = task, fn
        self.seq = next(self._ids)
        self.submitted = time.monotonic()
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.cancelled = False

    def check(self) -> None:
        """Call between tokens: stops the job if it was cancelled."""
        if self.cancelled:
            raise Cancelled()

    def wait(self, timeout: Optional[float] = None) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        if self.error is not None:
            raise self.error
        return self.result


class TaskScheduler:
    """Per-task queues and the worker. ``switch(task)`` makes the model serve ``task``
    (e.g. ``TaskSwitcher.activate``); it runs only on the worker, between jobs.

    The worker is a thread of its own (``start=True``, or :meth:`start` later) or the caller's
    thread (:meth:`run_here`, until :meth:`close`): ``sparsemerge serve`` decodes in the main
    thread, because numba's parallel regions launched from another thread cost ~40 us each
    instead of ~1 us once the main thread has launched some (libgomp then manages more threads
    than there are cores and stops spinning between regions), and a decode step launches
    hundreds of them (measured: 11-17 ms per SmolLM2 step from a worker thread, 6-8 ms from
    the main thread)."""

    def __init__(self, switch: Callable[[str], Any], burst: int = 8, start: bool = True) -> None:
        if burst < 1:
            raise SparsemergeError(f"burst must be >= 1, got {burst}")
        self._switch = switch
        self.burst = burst
        self._queues: dict[str, deque] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.active: Optional[str] = None
        self._in_a_row = 0
        self._current: Optional[Job] = None
        self.switches = 0
        self.cancelled = 0  # jobs stopped because their client left (or the server stopped)
        self.history: list[tuple[str, int]] = []  # (task, job seq) in the order run (tests, stats)
        self._worker: Optional[threading.Thread] = None
        if start:
            self.start()

    def start(self) -> None:
        """Run the worker in a thread of its own."""
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="sparsemerge-worker", daemon=True)
            self._worker.start()

    def run_here(self) -> None:
        """Run the worker in this thread until :meth:`close`. A KeyboardInterrupt (Ctrl-C)
        cancels the running job and propagates."""
        if self._worker is not None:
            raise SparsemergeError("the scheduler's worker already runs in a thread of its own")
        self._run()

    def submit(self, task: str, fn: Callable[[Job], Any]) -> Job:
        job = Job(task, fn)
        with self._cv:
            if self._closed:
                raise SparsemergeError("the server is shutting down")
            self._queues.setdefault(task, deque()).append(job)
            self._cv.notify()
        return job

    def pending(self) -> dict[str, int]:
        with self._cv:
            return {t: len(q) for t, q in self._queues.items() if q}

    def _next(self) -> Optional[Job]:
        """The next job (caller holds the lock): the active task's while it has some and its
        run is under ``burst`` (or nobody else waits), else the longest-waiting task's."""
        waiting = {t: q for t, q in self._queues.items() if q}
        if not waiting:
            return None
        others = [t for t in waiting if t != self.active]
        if self.active in waiting and (self._in_a_row < self.burst or not others):
            task = self.active
        else:
            task = min(others or list(waiting), key=lambda t: waiting[t][0].seq)
        return waiting[task].popleft()

    def _run(self) -> None:
        while True:
            with self._cv:
                job = self._next()
                while job is None and not self._closed:
                    self._cv.wait()
                    job = self._next()
                if job is None:
                    return
                self._current = job
            try:
                if job.cancelled:
                    raise Cancelled()
                if job.task != self.active:
                    self._switch(job.task)
                    self.active, self._in_a_row = job.task, 0
                    self.switches += 1
                self._in_a_row += 1
                self.history.append((job.task, job.seq))
                job.result = job.fn(job)
            except KeyboardInterrupt:  # Ctrl-C with the worker in the main thread: stop serving
                job.error = Cancelled()
                self.cancelled += 1
                raise
            except BaseException as exc:  # the job's error goes to its caller; the worker goes on
                job.error = exc
                self.cancelled += isinstance(exc, Cancelled)
            finally:
                self._current = None
                job.done.set()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is queued or running and stop the worker."""
        with self._cv:
            self._closed = True
            if self._current is not None:
                self._current.cancelled = True  # it stops at its next token
            for q in self._queues.values():
                for job in q:
                    job.cancelled = True
                    job.error = Cancelled()
                    job.done.set()
                q.clear()
            self._cv.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)
