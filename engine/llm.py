"""The offline / in-process Python API: `LLM.generate`, `generate_outputs`, `chat` and async `stream`."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from collections.abc import Sequence as Seq
from typing import Any

import torch
from tqdm.auto import tqdm

from engine.config import EngineConfig, compose_config
from engine.frontend import OutputProcessor, Sink, TrackedRequest
from engine.llm_engine import LLMEngine
from engine.models.source import resolve_model
from engine.outputs import RequestOutput
from engine.progress import progress
from engine.sampling_params import SamplingParams
from engine.tokenizer import encode_chat, load_tokenizer

Prompt = str | list[int]
log = logging.getLogger(__name__)


def announce_progress() -> None:
    """Show the engine's progress lines (engine/progress.py: reading and converting a GGUF, loading,
    compiling each graph) on stderr when the application has not set up logging itself: a first start
    otherwise sits silent for a minute or more."""
    engine_log = logging.getLogger("engine")
    if logging.getLogger().handlers or engine_log.handlers:
        return  # the application's logging (a Hydra app, the server) shows them already
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[engine] %(message)s"))
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO)
    engine_log.propagate = False


class LLM:
    """`LLM(model_path=None, dtype="auto", **overrides)`; no path means the embedded SmolLM2.

    Overrides take config group choices (`scheduler="lpm"`, `cache="none"`, `attention="flex"`) and
    values (`page_size=16`, `max_num_batched_tokens=256`, `enforce_eager=True`, `**{"compile.mode": ...}`).
    `config=` takes a whole `EngineConfig` instead (what `compose_config` or a Hydra app built).
    """

    def __init__(
        self,
        model_path: str | None = None,
        dtype: torch.dtype | str = "auto",
        *,
        config: EngineConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.config = config if config is not None else compose_config(model_path, dtype, **overrides)
        if self.config.progress_bar:
            announce_progress()
        source = resolve_model(self.config.model.path)
        with progress(log, f"starting the engine on {source.path.name}"):
            self.tokenizer = load_tokenizer(source)
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            self.engine = LLMEngine(self.config, source, extra_eos=eos)
        self.frontend = OutputProcessor(self.tokenizer, self.engine.abort_sequence)
        self._lock = threading.RLock()
        self._driver: asyncio.Task | None = None

    def shutdown(self) -> None:
        """Stop tensor-parallel ranks and leave the process group (nothing to do with one rank)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- inputs --------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError(f"invalid prompt {prompt!r:.80}: expected a string or a list of token ids")

    def encode_chat(self, messages: list[dict[str, Any]], chat_template_kwargs: dict | None = None) -> list[int]:
        return encode_chat(self.tokenizer, messages, chat_template_kwargs)

    @staticmethod
    def _params_for(
        count: int, sampling_params: SamplingParams | list[SamplingParams] | None, kwargs: dict[str, Any]
    ) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams.from_kwargs(**kwargs)
        elif kwargs:
            if isinstance(sampling_params, list):
                raise ValueError("pass sampling keyword arguments or a list of SamplingParams, not both")
            sampling_params = dataclasses.replace(sampling_params, **kwargs)
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        if len(sampling_params) != count:
            raise ValueError(f"invalid sampling_params: {len(sampling_params)} given for {count} prompts")
        return list(sampling_params)

    # -- request life cycle --------------------------------------------------------------------------

    def _submit(
        self, prompt: str | None, ids: list[int], params: SamplingParams, sink: Sink | None = None
    ) -> TrackedRequest:
        limits = self.config.server.limits  # the server's bounds hold offline too
        limits.check_params(params)
        limits.check_work([len(ids)], params)
        with self._lock:
            req = self.frontend.track(prompt, ids, params, sink)
            try:
                for sid, p in req.sequences():
                    # Each choice is its own sequence; the radix cache lets them share the prompt's KV.
                    self.engine.add_sequence(sid, ids, p)
            except Exception:
                self.frontend.abort(req)  # withdraws the choices already added
                raise
        return req

    def _step(self) -> None:
        """One engine step and the frontend work for what it produced."""
        with self._lock:
            for out in self.engine.step():
                self.frontend.process(out)

    def abort(self, req: TrackedRequest) -> None:
        with self._lock:
            self.frontend.abort(req)

    # -- offline API ---------------------------------------------------------------------------------

    def generate_outputs(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
        **sampling_kwargs: Any,
    ) -> list[RequestOutput]:
        """Like `generate`, with token ids, finish reasons, usage and logprobs per request."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_for(len(prompts), sampling_params, sampling_kwargs)
        encoded = [self.encode(p) for p in prompts]
        return self._run(
            [(p if isinstance(p, str) else None, ids, sp) for p, ids, sp in zip(prompts, encoded, params)], use_tqdm
        )

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
        **sampling_kwargs: Any,
    ) -> list[str]:
        """Completion texts, in prompt order; with n > 1 a prompt's n texts are consecutive.

        String prompts are raw text (no chat template), token-id lists are used as given.
        """
        outs = self.generate_outputs(prompts, sampling_params, use_tqdm=use_tqdm, **sampling_kwargs)
        return [c.text for o in outs for c in o.outputs]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool | None = None,
        **sampling_kwargs: Any,
    ) -> list[str]:
        """Reply texts to one conversation or a list of them (the model's chat template applied), in order;
        with n > 1 a conversation's n replies are consecutive. Like `generate` for prompts."""
        outs = self.chat_outputs(
            messages, sampling_params, chat_template_kwargs=chat_template_kwargs, use_tqdm=use_tqdm, **sampling_kwargs
        )
        return [c.text for o in outs for c in o.outputs]

    def chat_outputs(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        chat_template_kwargs: dict[str, Any] | None = None,
        use_tqdm: bool | None = None,
        **sampling_kwargs: Any,
    ) -> list[RequestOutput]:
        """Like `chat`, with token ids, finish reasons, usage and logprobs per conversation."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._params_for(len(conversations), sampling_params, sampling_kwargs)
        encoded = [self.encode_chat(m, chat_template_kwargs) for m in conversations]
        return self._run([(None, ids, sp) for ids, sp in zip(encoded, params)], use_tqdm)

    def _run(
        self, items: list[tuple[str | None, list[int], SamplingParams]], use_tqdm: bool | None
    ) -> list[RequestOutput]:
        requests: list[TrackedRequest] = []
        try:
            for prompt, ids, sp in items:
                requests.append(self._submit(prompt, ids, sp))
            show = self.config.progress_bar and len(items) > 1 if use_tqdm is None else use_tqdm
            with tqdm(total=len(requests), desc="generate", disable=not show, dynamic_ncols=True) as bar:
                done = 0
                while done < len(requests):
                    self._step()
                    now = sum(r.finished for r in requests)
                    bar.update(now - done)
                    done = now
        except BaseException:
            for r in requests:
                self.abort(r)
            raise
        return [r.output() for r in requests]

    # -- async streaming -----------------------------------------------------------------------------

    async def stream(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, **sampling_kwargs: Any
    ) -> AsyncIterator[str]:
        """Yield the completion's text as it is generated (n must be 1). Many may run concurrently;
        they share one engine loop. Breaking out of the iteration aborts the request."""
        (params,) = self._params_for(1, sampling_params, sampling_kwargs)
        if params.n != 1:
            raise ValueError(f"invalid n={params.n}: stream() yields a single completion")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()

        def sink(choice, delta, out):
            if delta or choice.finish_reason:
                loop.call_soon_threadsafe(queue.put_nowait, (delta, choice.finish_reason is not None))

        req = self._submit(prompt if isinstance(prompt, str) else None, self.encode(prompt), params, sink)
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        try:
            while True:
                delta, done = await queue.get()
                if delta:
                    yield delta
                if done:
                    return
        finally:
            self.abort(req)

    async def _drive(self) -> None:
        while True:
            with self._lock:
                if not self.engine.has_unfinished():
                    return
            await asyncio.to_thread(self._step)
