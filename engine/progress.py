"""One line per slow step a user waits on (reading a GGUF, converting its tokenizer, loading weights,
compiling a graph): when it starts, every PROGRESS_EVERY_S while it runs, and with its time when it ends,
so that no start-up phase sits silent for more than a few seconds. An engine step that runs longer than
that with none of those lines running (a compilation nothing announced, a stall) is announced too."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PROGRESS_EVERY_S = 4.0  # under 5 s of silence, with the logger's and the scheduler's jitter
_active = 0  # Progress lines running now; a slow step is announced only when none is
_active_lock = threading.Lock()


class Progress:
    def __init__(self, log: logging.Logger, label: str) -> None:
        global _active
        self.log, self.label = log, label
        self.started = time.perf_counter()
        self._finished = threading.Event()
        with _active_lock:
            _active += 1
        log.info("%s ...", label)
        threading.Thread(target=self._report, daemon=True).start()

    def _report(self) -> None:
        while not self._finished.wait(PROGRESS_EVERY_S):
            self.log.info("%s: %.0f s so far", self.label, time.perf_counter() - self.started)

    def finish(self, failed: bool = False) -> None:
        global _active
        if self._finished.is_set():
            return
        self._finished.set()
        with _active_lock:
            _active -= 1
        elapsed = time.perf_counter() - self.started
        self.log.info("%s: %s in %.1f s", self.label, "failed" if failed else "done", elapsed)


@contextmanager
def progress(log: logging.Logger, label: str) -> Iterator[None]:
    """Announce the block as `label`, as above."""
    p = Progress(log, label)
    try:
        yield
    except BaseException:
        p.finish(failed=True)
        raise
    p.finish()


class _StepWatch:
    """One thread per process that looks once a second at the steps running on each thread; a step costs
    two dictionary stores."""

    def __init__(self) -> None:
        self.running: dict[int, tuple[logging.Logger, str, float]] = {}
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def start(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._watch, name="slow-step-watch", daemon=True)
                self.thread.start()

    def _watch(self) -> None:
        announced: dict[int, float] = {}  # thread -> when its current step was last announced
        while True:
            time.sleep(min(1.0, PROGRESS_EVERY_S / 2))
            now = time.perf_counter()
            for thread, (log, label, started) in list(self.running.items()):
                last = announced.get(thread, 0.0)
                if last < started:
                    last = started
                if now - last >= PROGRESS_EVERY_S and _active == 0:
                    log.info("%s: %.0f s so far", label, now - started)
                    announced[thread] = now


_watch = _StepWatch()


@contextmanager
def slow_step(log: logging.Logger, label: str) -> Iterator[None]:
    """Announce the block every PROGRESS_EVERY_S once it has run that long, unless a Progress line is running."""
    _watch.start()
    key = threading.get_ident()
    _watch.running[key] = (log, label, time.perf_counter())
    try:
        yield
    finally:
        del _watch.running[key]
