"""How a child process of the server (the engine, a tensor-parallel rank) ends with its parent. Its own module:
the engine process and the ranks both need it, and the ranks are started by the engine."""

from __future__ import annotations

import os
import signal
import threading
import time


def exit_with_parent(interval: float = 0.5) -> None:
    """End this process as soon as its parent is gone, whatever it is doing (a step, a compilation, a
    collective): a watchdog thread, since the main thread may not look for minutes. Ctrl-C in a terminal
    reaches the whole process group; the parent alone handles it and shuts its children down."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
