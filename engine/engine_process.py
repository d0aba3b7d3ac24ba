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
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class AbortRequest:
    request_id: str


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


def engine_main(cfg_dict: dict[str, Any], inbox: mp.Queue, outbox: mp.Queue) -> None:
    """Entry point of the engine process: load, take the tokenizer's extra EOS ids, report ready, then step
    while there is work."""
    from engine.llm_engine import LLMEngine
    from engine.models.source import resolve_model

    parent = os.getppid()
    try:
        cfg = OmegaConf.create(cfg_dict)
        engine = LLMEngine(cfg, resolve_model(cfg.model.path))
    except Exception as e:  # reported to the parent, which exits with the message
        outbox.put(EngineFailed(f"{type(e).__name__}: {e}"))
        return
    while True:  # sent once the parent has loaded the tokenizer (both load at the same time)
        try:
            first = inbox.get(timeout=1.0)
            break
        except queue.Empty:
            if os.getppid() != parent:
                first = Shutdown()  # the parent died while loading
                break
    if isinstance(first, Shutdown):
        engine.shutdown()
        return
    engine.eos_token_ids.update(first.token_ids)
    outbox.put(EngineReady(os.getpid(), engine.max_model_len, engine.model_config.vocab_size, engine.stats(),
                           [w.pid for w in engine.workers]))
    while True:
        messages = []
        try:
            # Block only when idle; while sequences run, take whatever arrived and keep stepping.
            messages.append(inbox.get(timeout=0.5) if not engine.has_unfinished() else inbox.get_nowait())
            while True:
                messages.append(inbox.get_nowait())
        except queue.Empty:
            pass
        if not messages and not engine.has_unfinished():
            if os.getppid() != parent:
                return  # orphaned: the HTTP process is gone
            engine.check_health()  # a dead tensor-parallel rank ends this process, so /health turns red
        outputs: list[StepOutput] = []
        for m in messages:
            if isinstance(m, Shutdown):
                engine.shutdown()
                return
            if isinstance(m, AbortRequest):
                engine.abort_request(m.request_id)
            elif isinstance(m, AddRequest):
                try:
                    engine.add_request(m.request_id, m.prompt_token_ids, m.params)
                except ValueError as e:
                    outputs.append(StepOutput(m.request_id, [], finished=True, finish_reason="error", error=str(e)))
        if engine.has_unfinished():
            outputs.extend(engine.step())
        if outputs or messages:
            outbox.put(StepBatch(outputs, engine.stats()))


class EngineClient:
    """Starts the engine process and relays its outputs into the asyncio loop of the HTTP process."""

    def __init__(self, cfg: DictConfig) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited threads or torch state
        self.inbox: mp.Queue = ctx.Queue()
        self.outbox: mp.Queue = ctx.Queue()
        # Not a daemon: it starts tensor-parallel ranks of its own. It exits when orphaned (see engine_main).
        self.process = ctx.Process(target=engine_main, name="engine", daemon=False,
                                   args=(OmegaConf.to_container(cfg, resolve=True), self.inbox, self.outbox))
        self.info: EngineReady | None = None
        self.stats: dict[str, int] = {}
        self.dead_reason: str | None = None

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
                    raise RuntimeError(f"engine process exited with code {self.process.exitcode} while loading")
                if waited >= timeout:
                    self.process.kill()
                    raise RuntimeError(f"engine did not become ready within {timeout:.0f} s")
        if isinstance(msg, EngineFailed):
            self.process.join(timeout=10)
            raise RuntimeError(msg.message)
        self.info, self.stats = msg, msg.stats
        return msg

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self.process.is_alive()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.inbox.put(AddRequest(request_id, prompt_token_ids, params))

    def abort(self, request_id: str) -> None:
        if self.alive:
            self.inbox.put(AbortRequest(request_id))

    def relay(self, loop: asyncio.AbstractEventLoop, on_batch: Callable[[StepBatch], None],
              on_death: Callable[[str], None]) -> threading.Thread:
        """Read the engine's outputs on a thread; call back on the loop. Notices the process dying."""

        def run() -> None:
            while True:
                try:
                    msg = self.outbox.get(timeout=0.25)
                except queue.Empty:
                    if not self.process.is_alive():
                        self.dead_reason = f"engine process died (exit code {self.process.exitcode})"
                        loop.call_soon_threadsafe(on_death, self.dead_reason)
                        return
                    continue
                except (EOFError, OSError):
                    return
                loop.call_soon_threadsafe(on_batch, msg)

        thread = threading.Thread(target=run, name="engine-relay", daemon=True)
        thread.start()
        return thread

    def shutdown(self) -> None:
        if self.process.is_alive():
            self.inbox.put(Shutdown())
            self.process.join(timeout=5)
            if self.process.is_alive():
                self.process.kill()
