"""Where a stream session's answers run: inline on the feeding thread, or (barge-in) on one worker thread.

With barge-in the feeding thread must keep taking audio while an answer is generated, so speech over the
answer can be detected and cancel it. Finished turns and errors therefore cross threads: turns are queued
under a lock until the feeding thread collects them, and an answer's error is kept and raised on the
feeding thread between events (never lost on the worker, never raised twice).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class AnswerWorker(Generic[T]):
    """Runs one answer at a time and queues what it produced (`T`: the session's turn events).

    `background=False`: `run()` answers inline; `busy` is then never true and `cancel()` does nothing.
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._done: list[T] = []
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        """An answer is being generated on the worker thread."""
        return self._thread is not None and self._thread.is_alive()

    def cancel(self) -> None:
        """Ask the answer in progress (if any) to stop after its current token."""
        if self.busy:
            self._cancel.set()

    def stop_requested(self) -> bool:
        """Polled by the generation loop after each token (its `should_stop`)."""
        return self._cancel.is_set()

    def run(self, answer: Callable[[], None]) -> None:
        """Run `answer` inline, or on a new worker thread (the previous one must have been joined)."""
        if not self.background:
            self._safely(answer)
            return
        self._cancel.clear()
        self._thread = threading.Thread(target=self._safely, args=(answer,), name="qae-answer", daemon=True)
        self._thread.start()

    def _safely(self, answer: Callable[[], None]) -> None:
        try:
            answer()
        except BaseException as e:
            if self._error is None:
                self._error = e

    def join(self, raise_error: bool = True) -> None:
        """Wait for the answer in progress; then raise the error an answer ended with, unless told not to
        (the caller first commits the utterance it is ending, and raises later)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if raise_error:
            self.raise_pending()

    def raise_pending(self) -> None:
        """Raise the error an answer ended with (kept until the feeding thread is between events)."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def publish(self, item: T) -> None:
        """A finished turn (called by the answer, on whichever thread runs it)."""
        with self._lock:
            self._done.append(item)

    def drain(self) -> list[T]:
        """The finished turns not collected yet, oldest first."""
        with self._lock:
            out, self._done = self._done, []
        return out

    def put_back(self, items: list[T]) -> None:
        """Return collected turns to the front of the queue (for the next `drain()`)."""
        with self._lock:
            self._done = items + self._done

    def stop(self) -> None:
        """Cancel and wait for the answer in progress; forget its error and every queued turn (session reset)."""
        if self._thread is not None:  # a failure it had is moot now
            self._cancel.set()
            self._thread.join()
        self._thread, self._error = None, None
        with self._lock:
            self._done = []
