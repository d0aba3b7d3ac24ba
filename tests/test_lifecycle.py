"""The server's processes end when it is told to, or when it dies: SIGTERM, Ctrl-C to the whole process
group, a signal in the middle of compilation, and a SIGKILL of the HTTP process. Checked in the
process table (every descendant of the server, tensor-parallel ranks included)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from live_server import descendants, start_server, wait_gone, wait_ready

EXIT_WITHIN_S = 10


class Stream(threading.Thread):
    """One streamed completion read on a thread; `lines` holds every SSE data payload received."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.lines, self.started = url, [], threading.Event()
        self.error: httpx.HTTPError | None = None

    def run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line[6:])
                        if len(self.lines) >= 3:
                            self.started.set()
        except httpx.HTTPError as e:  # the server was killed mid-stream
            self.error = e


def stream_then_signal(proc, url: str, send) -> tuple[Stream, list[int]]:
    wait_ready(proc, url)
    stream = Stream(url)
    stream.start()
    assert stream.started.wait(60), "the stream never started"
    family = descendants(proc.pid)
    send()
    return stream, family


def assert_clean_exit(proc, family: list[int], stream: Stream | None = None) -> str:
    start = time.time()
    out, _ = proc.communicate(timeout=EXIT_WITHIN_S + 5)
    assert time.time() - start < EXIT_WITHIN_S, f"the server took {time.time() - start:.1f} s to exit"
    assert proc.returncode == 0, out
    assert not wait_gone(family, EXIT_WITHIN_S - (time.time() - start)), "processes left behind"
    assert "Traceback" not in out and "terminate called" not in out, out
    if stream is not None:
        stream.join(5)
        assert stream.lines[-1] == "[DONE]"
        assert json.loads(stream.lines[-2])["error"]["message"] == "the server is shutting down"
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_sigterm_ends_open_streams_and_every_process(tiny_qwen3, tmp_path, tp):
    proc, url = start_server(tiny_qwen3, tmp_path, f"parallel.tp={tp}")
    stream, family = stream_then_signal(proc, url, lambda: proc.send_signal(signal.SIGTERM))
    assert len(family) >= 1 + tp  # the engine (and its ranks), plus multiprocessing's helpers
    assert_clean_exit(proc, family, stream)


def test_ctrl_c_to_the_process_group_shuts_down_without_a_traceback(tiny_qwen3, tmp_path):
    proc, url = start_server(tiny_qwen3, tmp_path, "parallel.tp=2", new_session=True)
    stream, family = stream_then_signal(proc, url, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert_clean_exit(proc, family, stream)


@pytest.mark.slow
def test_sigterm_while_compiling_still_exits_in_time(tiny_qwen3, tmp_path):
    # compile.enabled (background warm-up): right after start the graphs are still compiling.
    proc, url = start_server(tiny_qwen3, tmp_path, "compile.enabled=true")
    wait_ready(proc, url)
    time.sleep(1)
    assert httpx.get(f"{url}/metrics").text.count("engine_decode_compiled 0.0") == 1, "compilation already done"
    family = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert_clean_exit(proc, family)


def test_engine_and_ranks_exit_when_the_http_process_is_killed(tiny_qwen3, tmp_path):
    proc, url = start_server(tiny_qwen3, tmp_path, "parallel.tp=2")
    stream, family = stream_then_signal(proc, url, proc.kill)
    proc.wait(5)
    assert not wait_gone(family, EXIT_WITHIN_S), "the engine or its ranks outlived the HTTP process"
    stream.join(5)
    assert stream.error is not None  # the connection broke; nothing answered for the dead server
