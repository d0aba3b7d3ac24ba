"""The engine in its own process (scheduler + model), and the client the HTTP process talks to it with.

Only small typed messages cross the boundary: token ids in, `StepOutput`s and stats out. Text work
(tokenizer, chat template, detokenizer, stop strings) stays in the HTTP process, so neither blocks the
other (Mini-SGLang's split).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from engine.config import EngineConfig
from engine.lifecycle import exit_with_parent
from engine.models.source import resolve_model
from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

# The queues of stopped engines, held until the interpreter exits, so that multiprocessing's exit handler
# unlinks their semaphores on the main thread. Released earlier, the last reference to a queue's semaphore is
# its feeder thread's: the unlink then ran on that daemon thread, which the exiting interpreter could freeze
# between the unlink and telling the resource tracker ("1 leaked semaphore objects" on a failed start, seen
# once in CI; tests/test_lifecycle.py widens that window to reproduce it every time).
_STOPPED_QUEUES: list[mp.Queue] = []


@dataclass
class AddSequence:
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class AbortSequence:
    seq_id: str


@dataclass
class Shutdown:
    pass


@dataclass
class ExtraEos:
    """End-of-sequence ids the frontend's tokenizer names beyond the model config's; the first message."""

    token_ids: list[int]


@dataclass
class EngineReady:
    pid: int
    max_model_len: int
    vocab_size: int
    stats: dict[str, int]
    tp_rank_pids: list[int] = field(default_factory=list)


@dataclass
class EngineFailed:
    message: str


@dataclass
class StepBatch:
    outputs: list[StepOutput]
    stats: dict[str, int] = field(default_factory=dict)


def engine_main(cfg: EngineConfig, inbox: mp.Queue, outbox: mp.Queue) -> None:
    """Entry point of the engine process: load, hand-shake, then step while there is work."""
    exit_with_parent()
    # tqdm's default lock is a multiprocessing semaphore (first made by torch.fx during a compilation), which
    # the os._exit below leaves registered: "1 leaked semaphore objects" at every stop. Nothing shares this
    # process's bars, so a thread lock does.
    tqdm.set_lock(threading.RLock())
    # Same line format as the HTTP process's (Hydra's), so the engine's lines (compiling, tensor parallel)
    # read as one log.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        from engine.llm_engine import LLMEngine  # torch: only this process needs it, not the HTTP one

        engine = LLMEngine(cfg, resolve_model(cfg.model.path))
    except Exception as e:  # reported to the parent, which exits with the message
        outbox.put(EngineFailed(f"{type(e).__name__}: {e}"))
        return
    if _handshake(engine, inbox, outbox):
        _serve(engine, inbox, outbox)
    engine.shutdown()
    # A background compilation may still be running inside inductor's C++: interpreter finalisation then
    # aborts the process ("terminate called without an active exception", seen on a SIGTERM mid-compile).
    # Nothing is left to clean up, so leave without it.
    outbox.cancel_join_thread()  # what is still queued for a parent that is shutting down does not matter
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _handshake(engine: LLMEngine, inbox: mp.Queue, outbox: mp.Queue) -> bool:
    """Take the tokenizer's extra EOS ids (sent once the parent has loaded it; both load at the same time)
    and report ready. False if the parent asked to shut down meanwhile."""
    first = inbox.get()
    if isinstance(first, Shutdown):
        return False
    engine.eos_token_ids.update(first.token_ids)
    outbox.put(
        EngineReady(
            os.getpid(),
            engine.max_model_len,
            engine.model_config.vocab_size,
            engine.stats(),
            [w.pid for w in engine.workers],
        )
    )
    return True


def _serve(engine: LLMEngine, inbox: mp.Queue, outbox: mp.Queue) -> None:
    """Apply what arrived, step once, report; until told to shut down."""
    while True:
        messages = _drain(inbox, block=not engine.has_unfinished())
        if not messages and not engine.has_unfinished():
            engine.check_health()  # a dead tensor-parallel rank ends this process, so /health turns red
        if any(isinstance(m, Shutdown) for m in messages):
            return
        outputs = _apply(engine, messages)
        if engine.has_unfinished():
            outputs.extend(engine.step())
        if outputs or messages:
            outbox.put(StepBatch(outputs, engine.stats()))


def _drain(inbox: mp.Queue, block: bool) -> list[Any]:
    """Everything in the inbox; waits a little for the first message only when the engine is idle."""
    messages = []
    try:
        messages.append(inbox.get(timeout=0.5) if block else inbox.get_nowait())
        while True:
            messages.append(inbox.get_nowait())
    except queue.Empty:
        pass
    return messages


def _apply(engine: LLMEngine, messages: list[Any]) -> list[StepOutput]:
    """Add and abort sequences; a sequence the engine refuses comes back as an error output."""
    outputs = []
    for m in messages:
        if isinstance(m, AbortSequence):
            engine.abort_sequence(m.seq_id)
        elif isinstance(m, AddSequence):
            try:
                engine.add_sequence(m.seq_id, m.prompt_token_ids, m.params)
            except Exception as e:  # one bad request must not take the engine down
                log.exception("refused sequence %s", m.seq_id)
                outputs.append(StepOutput(m.seq_id, [], finished=True, finish_reason="error", error=str(e)))
    return outputs


class EngineClient:
    """Starts the engine process and relays its outputs into the asyncio loop of the HTTP process."""

    def __init__(self, cfg: EngineConfig) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or torch state
        self.inbox: mp.Queue = ctx.Queue()
        self.outbox: mp.Queue = ctx.Queue()
        # Not a daemon: it starts tensor-parallel ranks of its own. It exits when orphaned (`exit_with_parent`).
        self.process = ctx.Process(target=engine_main, name="engine", daemon=False, args=(cfg, self.inbox, self.outbox))
        self.info: EngineReady | None = None
        self.stats: dict[str, int] = {}
        self.dead_reason: str | None = None
        self.stopping = False  # set by shutdown: the process ending then is no failure

    def launch(self) -> None:
        """Start loading the model in the engine process; the caller goes on with its own loading."""
        self.process.start()

    def wait_ready(self, extra_eos: list[int], timeout: float = 900.0) -> EngineReady:
        """Hand the engine the tokenizer's EOS ids and wait for it to finish loading; RuntimeError with its
        message if it fails."""
        self.inbox.put(ExtraEos(list(extra_eos)))
        waited = 0.0
        while True:
            try:
                msg = self.outbox.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if not self.process.is_alive():
                    raise RuntimeError(
                        f"engine process exited with code {self.process.exitcode} while loading"
                    ) from None
                if waited >= timeout:
                    self.process.kill()
                    raise RuntimeError(f"engine did not become ready within {timeout:.0f} s") from None
        if isinstance(msg, EngineFailed):
            self.process.join(timeout=10)
            raise RuntimeError(msg.message)
        self.info, self.stats = msg, msg.stats
        return msg

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process.is_alive()

    def add(self, seq_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.inbox.put(AddSequence(seq_id, prompt_token_ids, params))

    def abort(self, seq_id: str) -> None:
        if self.alive:
            self.inbox.put(AbortSequence(seq_id))

    def relay(
        self, loop: asyncio.AbstractEventLoop, on_batch: Callable[[StepBatch], None], on_death: Callable[[str], None]
    ) -> threading.Thread:
        """Read the engine's outputs on a thread; call back on the loop. Notices the process dying."""

        def run() -> None:
            while True:
                try:
                    msg = self.outbox.get(timeout=0.25)
                except queue.Empty:
                    if self.stopping:
                        return
                    if not self.process.is_alive():
                        self.dead_reason = f"engine process died (exit code {self.process.exitcode})"
                        loop.call_soon_threadsafe(on_death, self.dead_reason)
                        return
                    continue
                except (EOFError, OSError):
                    return
                try:
                    loop.call_soon_threadsafe(on_batch, msg)
                except RuntimeError:  # the loop is closed: the server has stopped
                    return

        thread = threading.Thread(target=run, name="engine-relay", daemon=True)
        thread.start()
        return thread

    def shutdown(self, timeout: float = 4.0) -> None:
        """Ask the engine to stop; kill it if it has not within `timeout` (it only reads its inbox between
        steps, and a compilation can take minutes). Its tensor-parallel ranks follow it out on their own."""
        self.stopping = True
        _STOPPED_QUEUES.extend((self.inbox, self.outbox))
        # What is still queued for the engine is dropped at exit instead of joined: a large request queued for
        # an engine that no longer reads kept the HTTP process alive, blocked writing into the full pipe.
        self.inbox.cancel_join_thread()
        if self.process.is_alive():
            self.inbox.put(Shutdown())
            self.process.join(timeout=timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=2)
