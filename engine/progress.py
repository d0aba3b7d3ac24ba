"""One line per slow step a user waits on (reading a GGUF, converting its tokenizer, loading weights,
compiling a graph): when it starts, every PROGRESS_EVERY_S while it runs, and with its time when it ends,
so that no start-up phase sits silent for more than a few seconds."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

PROGRESS_EVERY_S = 5.0


class Progress:
    def __init__(self, log: logging.Logger, label: str) -> None:
        self.log, self.label = log, label
        self.started = time.perf_counter()
        self._finished = threading.Event()
        log.info("%s ...", label)
        threading.Thread(target=self._report, daemon=True).start()

    def _report(self) -> None:
        while not self._finished.wait(PROGRESS_EVERY_S):
            self.log.info("%s: %.0f s so far", self.label, time.perf_counter() - self.started)

    def finish(self, failed: bool = False) -> None:
        self._finished.set()
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
