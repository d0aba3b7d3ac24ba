"""The server's processes end when it is told to, or when it dies: SIGTERM, Ctrl-C to the whole process
group, a signal in the middle of compilation, and a SIGKILL of the HTTP process. Checked in the
process table (every descendant of the server, tensor-parallel ranks included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import ROOT, descendants, free_port, start_server, wait_gone, wait_ready

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
    assert "leaked semaphore" not in out, out  # multiprocessing's resource tracker, at exit
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


# The server with its tokenizer load failing the way transformers 5.25 did beside this project's old
# top-level `kernels` package (issue #33): the import error surfaced while the engine was already loading.
BROKEN_TOKENIZER = """
import runpy, sys, time
import engine.tokenizer

def load_tokenizer(source):
    time.sleep(2)  # the engine process is loading the model meanwhile
    raise ImportError("cannot import name 'CUDAProperties' from 'kernels'")

engine.tokenizer.load_tokenizer = load_tokenizer
sys.argv = ["server.py", *sys.argv[1:]]
runpy.run_path("server.py", run_name="__main__")
"""


# Widens the window in which a semaphore unlinked off the main thread has not yet been reported to
# multiprocessing's resource tracker: a server whose queues' semaphores are freed by their feeder threads then
# prints "leaked semaphore" at every failed start (seen once in CI without it).
SLOW_UNLINK = """
import atexit, gc, sys, threading, time
import multiprocessing.synchronize as synchronize

unlink = synchronize.sem_unlink

def slow_unlink(name):
    unlink(name)
    if threading.current_thread() is not threading.main_thread():
        print(f"unlinked {name} on {threading.current_thread().name}", file=sys.stderr)
        time.sleep(0.5)

synchronize.sem_unlink = slow_unlink

def free_then_wait():  # before multiprocessing's exit handler (atexit runs last-registered first)
    gc.collect()  # what only a cycle still holds is freed now, not after that handler
    time.sleep(0.3)  # and the feeder threads of queues freed so get to finish first

atexit.register(free_then_wait)
"""


def server_args(model: Path, tmp: Path) -> list[str]:
    return [sys.executable, "server.py", f"model.path={model}", "dtype=float32", "compile.enabled=false",
            f"server.port={free_port()}", f"hydra.run.dir={tmp}"]  # fmt: skip


def run_failing_start(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, list[int], float]:
    """Run a server start that fails: exit code, output, every process it started, seconds it took."""
    start = time.time()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    family: set[int] = set()
    while proc.poll() is None and time.time() - start < 60:
        family.update(descendants(proc.pid))
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=5)
    return proc.returncode, out, sorted(family), time.time() - start


def assert_failed_start(code: int, out: str, family: list[int], message: str) -> None:
    assert code == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out and "leaked semaphore" not in out, out
    assert family, "the engine process never started: the failure was not injected while it loaded"
    assert not wait_gone(family, EXIT_WITHIN_S), "the engine outlived the failed start"


def test_a_tokenizer_failure_ends_the_server_and_its_engine(tiny_qwen3, tmp_path):
    args = server_args(tiny_qwen3, tmp_path)
    code, out, family, seconds = run_failing_start([sys.executable, "-c", BROKEN_TOKENIZER, *args[2:]])
    assert_failed_start(code, out, family, "cannot load the tokenizer of")
    assert "ImportError: cannot import name 'CUDAProperties'" in out
    assert seconds < 30, f"the failed start took {seconds:.0f} s"


def test_a_weights_failure_ends_the_server_with_the_engines_error(tiny_qwen3, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_qwen3, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(SLOW_UNLINK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")]))}
    code, out, family, _ = run_failing_start(server_args(broken, tmp_path), env)
    assert_failed_start(code, out, family, "the engine failed to start")
