"""Starting and watching a real `python server.py` for the tests (shared by the HTTP and the browser tests)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-qwen3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path | None, tmp: Path, *extra: str, port: int | None = None, new_session: bool = False
) -> tuple[subprocess.Popen, str]:
    """`python server.py` on a free port; model_dir None serves the embedded default model. With
    `new_session` it leads a process group of its own (as a shell's foreground job does, for Ctrl-C)."""
    port = port or free_port()
    model = [] if model_dir is None else [f"model.path={model_dir}"]
    cmd = [
        sys.executable,
        "server.py",
        *model,
        f"model.served_model_name={MODEL}",
        "dtype=float32",
        "compile.enabled=false",
        f"server.port={port}",
        f"hydra.run.dir={tmp}",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=new_session
    )
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running_server(model_dir: Path | None, tmp: Path, *extra: str) -> Iterator[str]:
    """A healthy server for the block (its URL), stopped afterwards."""
    proc, url = start_server(model_dir, tmp, *extra)
    try:
        wait_ready(proc, url)
        yield url
    finally:
        stop(proc)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not become healthy in time")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_idle(url: str, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (
            metric(url, "engine_requests_running") == 0
            and metric(url, "engine_requests_waiting") == 0
            and metric(url, "engine_kv_pages_used") == 0
        ):
            return
        time.sleep(0.2)
    raise AssertionError("engine still holds requests or KV pages")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` now (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child nobody reaped yet counts as gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after up to `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in pids if running(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if running(p)]
