"""OpenAI-compatible HTTP server: `python server.py [hydra overrides]`.

This process does HTTP, tokenization, chat templates and detokenization; the engine (scheduler +
model) runs in its own process (engine/engine_process.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import hydra
from omegaconf import DictConfig
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.engine_process import EngineClient, StepBatch
from engine.frontend import Completion, OutputProcessor, TrackedRequest
from engine.models.source import resolve_model, served_model_name
from engine.openai_protocol import (APIError, ResponseHeader, chat_logprobs, chat_messages, completion_logprobs,
                                    completion_prompts, error_body, sampling_params, stream_options, usage_dict)
from engine.outputs import StepOutput, Usage
from engine.sampling_params import InvalidParameter, SamplingParams, check_request
from engine.tokenizer import encode_chat, load_tokenizer

log = logging.getLogger("server")


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge("engine_requests_running", "Sequences being generated", registry=r)
        self.waiting = Gauge("engine_requests_waiting", "Sequences waiting for admission", registry=r)
        self.kv_used = Gauge("engine_kv_pages_used", "KV pages held by running sequences", registry=r)
        self.kv_free = Gauge("engine_kv_pages_free", "KV pages free or evictable from the prefix cache", registry=r)
        self.kv_cached = Gauge("engine_kv_pages_cached", "KV pages held by the prefix cache", registry=r)
        self.decode_compiled = Gauge("engine_decode_compiled", "1 once decode steps run the compiled graphs",
                                     registry=r)
        self.requests = Counter("engine_requests", "Requests received", registry=r)
        self.prompt_tokens = Counter("engine_prompt_tokens", "Prompt tokens received", registry=r)
        self.generated = Counter("engine_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("engine_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)
        self.itl = Histogram("engine_inter_token_latency_seconds", "Time between tokens of a sequence",
                             buckets=buckets, registry=r)
        self.e2e = Histogram("engine_e2e_request_latency_seconds", "Request latency", buckets=buckets, registry=r)

    def update(self, stats: dict[str, int]) -> None:
        free = stats["kv_pages_free"] + stats["kv_pages_evictable"]
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_free.set(free)
        self.kv_used.set(stats["kv_pages_total"] - free)
        self.kv_cached.set(stats["kv_pages_cached"])
        self.decode_compiled.set(stats["decode_compiled"])


class Server:
    """State behind the routes: one engine client, one output processor, the metrics."""

    def __init__(self, cfg: DictConfig, tokenizer, client: EngineClient) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.client = client
        self.model_name = served_model_name(cfg.model.served_model_name, cfg.model.path)
        self.frontend = OutputProcessor(tokenizer, client.abort, prefix="http")
        self.metrics = Metrics()
        self.last_token_at: dict[str, float] = {}

    # -- engine events (on the event loop) -----------------------------------------------------------

    def on_batch(self, batch: StepBatch) -> None:
        for out in batch.outputs:
            self.frontend.process(out)
        if batch.stats:
            self.metrics.update(batch.stats)

    def on_death(self, reason: str) -> None:
        log.error("%s; failing in-flight requests", reason)
        self.frontend.fail_all(reason)

    # -- submitting ----------------------------------------------------------------------------------

    def submit(self, prompts: list[tuple[str | None, list[int]]], params: SamplingParams
               ) -> tuple[list[TrackedRequest], asyncio.Queue]:
        if not self.client.alive:
            raise APIError(503, "the engine is not running", "server_error")
        info = self.client.info
        for _, ids in prompts:
            try:
                check_request(ids, params, info.vocab_size, info.max_model_len)
            except InvalidParameter as e:
                raise APIError(400, str(e), param=e.param) from None
        events: asyncio.Queue[tuple[Completion, str, StepOutput]] = asyncio.Queue()
        start = time.perf_counter()

        def sink(choice: Completion, delta: str, out: StepOutput) -> None:
            now = time.perf_counter()
            if out.new_token_ids:
                self.metrics.generated.inc(len(out.new_token_ids))
                last = self.last_token_at.get(choice.sequence_id)
                (self.metrics.ttft.observe(now - start) if last is None else self.metrics.itl.observe(now - last))
                self.last_token_at[choice.sequence_id] = now
            if choice.finish_reason is not None:
                self.last_token_at.pop(choice.sequence_id, None)
            events.put_nowait((choice, delta, out))

        requests = []
        try:
            for text, ids in prompts:
                req = self.frontend.track(text, ids, params, sink)
                requests.append(req)
                for sid, p in req.engine_requests():
                    self.client.add(sid, ids, p)
                self.metrics.requests.inc()
                self.metrics.prompt_tokens.inc(len(ids))
        except BaseException:
            self.abort(requests)
            raise
        return requests, events

    def abort(self, requests: list[TrackedRequest]) -> None:
        for r in requests:
            self.frontend.abort(r)


# ------------------------------------------------------------------------------------------------ app


def create_app(server: Server) -> Starlette:
    async def parse(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != server.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{server.model_name}'",
                           param="model", code="model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError(400, "'stream' must be a boolean", param="stream")
        return body

    async def wait_all(requests: list[TrackedRequest], events: asyncio.Queue, request: Request) -> None:
        """Wait until every choice finished; abort if the client goes away first."""
        try:
            while not all(r.finished for r in requests):
                try:
                    await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        server.abort(requests)
                        return
        except asyncio.CancelledError:
            server.abort(requests)
            raise
        errors = [c.finish_reason for r in requests for c in r.choices if c.finish_reason == "error"]
        if errors:
            raise APIError(500, server.client.dead_reason or "the engine failed this request", "server_error")

    def usage_of(requests: list[TrackedRequest]) -> Usage:
        parts = [r.output().usage for r in requests]
        return Usage(sum(u.prompt_tokens for u in parts), sum(u.completion_tokens for u in parts),
                     sum(u.cached_tokens for u in parts))

    async def sse(requests: list[TrackedRequest], events: asyncio.Queue, header: ResponseHeader, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
        n = requests[0].params.n
        index = {id(r): i for i, r in enumerate(requests)}
        obj = "chat.completion.chunk" if chat else "text_completion"
        owners = {c.sequence_id: r for r in requests for c in r.choices}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return f"data: {json.dumps(header.wrap(obj, choices, **extra))}\n\n"

        try:
            if chat:
                for r in requests:
                    for c in r.choices:
                        yield chunk([{"index": index[id(r)] * n + c.index, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
            while not all(r.finished for r in requests):
                c, delta, out = await events.get()
                if out.error is not None:
                    yield f"data: {json.dumps(error_body(out.error, 'server_error'))}\n\n"
                    server.abort(requests)
                    break
                r = owners[c.sequence_id]
                i = index[id(r)] * n + c.index
                lp = None
                if r.params.logprobs and out.new_token_ids:
                    lp = (chat_logprobs if chat else completion_logprobs)(server.tokenizer, out.new_token_ids,
                                                                         out.new_logprobs)
                if delta or lp is not None or c.finish_reason is not None:
                    body = {"delta": {"content": delta} if delta else {}} if chat else {"text": delta}
                    yield chunk([{"index": i, **body, "logprobs": lp, "finish_reason": c.finish_reason}])
            if include_usage:
                yield chunk([], usage=usage_dict(usage_of(requests)))
            yield "data: [DONE]\n\n"
        finally:
            server.abort(requests)  # no-op when all finished; frees KV when the client went away

    def respond(requests: list[TrackedRequest], header: ResponseHeader, chat: bool) -> JSONResponse:
        n = requests[0].params.n
        choices = []
        for ri, r in enumerate(requests):
            for c in r.choices:
                lp = None
                if r.params.logprobs:
                    lp = (chat_logprobs if chat else completion_logprobs)(server.tokenizer, c.token_ids, c.logprobs)
                body = ({"message": {"role": "assistant", "content": c.text.text}} if chat
                        else {"text": c.text.text})
                choices.append({"index": ri * n + c.index, **body, "logprobs": lp, "finish_reason": c.finish_reason})
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse(header.wrap(obj, choices, usage=usage_dict(usage_of(requests))))

    async def generate(request: Request, chat: bool) -> Response:
        body = await parse(request)
        params = sampling_params(body, chat)
        if chat:
            kwargs = body.get("chat_template_kwargs") or {}
            if not isinstance(kwargs, dict):
                raise APIError(400, "'chat_template_kwargs' must be an object", param="chat_template_kwargs")
            try:
                prompts = [(None, encode_chat(server.tokenizer, chat_messages(body), kwargs))]
            except ValueError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            prompts = [(p, server.tokenizer.encode(p)) if isinstance(p, str) else (None, p)
                       for p in completion_prompts(body)]
        header = ResponseHeader.new("chatcmpl" if chat else "cmpl", server.model_name)
        started = time.perf_counter()
        requests, events = server.submit(prompts, params)
        if body.get("stream"):
            return StreamingResponse(sse(requests, events, header, chat, stream_options(body)),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await wait_all(requests, events, request)
        server.metrics.e2e.observe(time.perf_counter() - started)
        return respond(requests, header, chat)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, chat=True)

    async def completions(request: Request) -> Response:
        return await generate(request, chat=False)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_name, "object": "model", "created": int(time.time()), "owned_by": "engine",
             "max_model_len": server.client.info.max_model_len}]})

    async def health(request: Request) -> Response:
        if server.client.alive:
            return JSONResponse({"status": "ok", "engine_pid": server.client.info.pid,
                                 "tp_rank_pids": server.client.info.tp_rank_pids})
        return JSONResponse({"status": "error", "reason": server.client.dead_reason or "engine not running"},
                            status_code=503)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(server.metrics.registry), media_type="text/plain; version=0.0.4")

    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{exc.detail}: {request.method} {request.url.path}", kind),
                            status_code=exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        server.client.relay(asyncio.get_running_loop(), server.on_batch, server.on_death)
        yield

    api_key = server.cfg.server.api_key
    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan, middleware=[Middleware(RequireAPIKey, key=api_key)] if api_key else [])


class RequireAPIKey:
    """Pure ASGI (not BaseHTTPMiddleware, which would buffer streams and hide disconnects)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            response = JSONResponse(error_body("invalid or missing API key", "invalid_request_error",
                                               code="invalid_api_key"), status_code=401)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------- start-up


class StartupError(Exception):
    pass


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(cfg: DictConfig) -> None:
    import uvicorn

    host, port = cfg.server.host, int(cfg.server.port)
    sock = bind(host, port)  # fail on a taken port before spending time on the model
    try:
        source = resolve_model(cfg.model.path)
    except (OSError, ValueError) as e:
        raise StartupError(str(e)) from None
    # The engine process imports torch and loads the model while this one loads the tokenizer.
    client = EngineClient(cfg)
    client.launch()
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as e:
        client.shutdown()
        raise StartupError(str(e)) from None
    try:
        info = client.wait_ready([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    except RuntimeError as e:
        raise StartupError(f"the engine failed to start: {e}") from None
    server = Server(cfg, tokenizer, client)
    app = create_app(server)
    mode = cfg.compile.mode if cfg.compile.enabled else "eager"
    log.info("ready: model=%s (%s) dtype=%s kv_pages=%d x %d tokens compile=%s url=http://%s:%d/v1",
             server.model_name, source.path, cfg.dtype, info.stats["kv_pages_total"], cfg.kv_cache.page_size,
             mode, host, port)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)).run(sockets=[sock])
    finally:
        client.shutdown()


@hydra.main(config_path="configs", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        serve(cfg)
    except StartupError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
