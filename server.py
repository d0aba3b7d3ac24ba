"""OpenAI-compatible HTTP server: `python server.py [hydra overrides]`.

This process does HTTP, tokenization, chat templates and detokenization; the engine (scheduler +
model) runs in its own process (engine/engine_process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import hydra
import uvicorn
from omegaconf import DictConfig
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

import engine
from engine.config import ConfigError, EngineConfig
from engine.engine_process import EngineClient, StepBatch
from engine.errors import APIError, error_body
from engine.frontend import Completion, OutputProcessor, TrackedRequest
from engine.limits import RequestLimits, depth
from engine.metrics import Metrics
from engine.models.source import resolve_model, served_model_name
from engine.openai_protocol import (
    SSE_DONE,
    ParsedRequest,
    ResponseHeader,
    choice_logprobs,
    delta_choice,
    final_choice,
    object_name,
    parse_request,
    role_choice,
    sse,
    tool_calls_choice,
    total_usage,
    usage_dict,
)
from engine.openapi import openapi_document
from engine.outputs import StepOutput, TokenLogprob
from engine.tokenizer import load_tokenizer
from engine.tool_calls import ToolRequest, ToolStream, extract_calls

log = logging.getLogger("server")
WEB_DIR = Path(engine.__file__).resolve().parent / "web"  # the chat page served at /

# (choice, newly visible text, the engine's output, whether it is the choice's last event). "Last" is fixed
# when the event is made: by the time a stream reads it, later outputs may already have finished the choice.
Event = tuple[Completion, str, StepOutput, bool]


class Server:
    """State behind the routes: one engine client, one output processor, the metrics."""

    def __init__(self, cfg: EngineConfig, tokenizer: Any, client: EngineClient) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.client = client
        self.model_name = served_model_name(cfg.model.served_model_name, cfg.model.path)
        self.frontend = OutputProcessor(tokenizer, client.abort, prefix="http")
        self.metrics = Metrics()
        self.started = int(time.time())  # `created` of the model in /v1/models
        # Stable while the served model and its numerics are: clients may compare it across responses.
        setup = f"{self.model_name}|{cfg.dtype}|{cfg.attention.target}|{cfg.compile.enabled}"
        self.fingerprint = "fp_" + hashlib.sha1(setup.encode()).hexdigest()[:10]
        self.shutting_down = False
        self.in_flight: dict[str, int] = {}  # requests per client address, for server.limits.per_client

    def admit(self, client: str) -> Callable[[], None]:
        """Count a request of `client` in flight (429 beyond server.limits.per_client); returns its release."""
        limit = self.cfg.server.limits.per_client
        if limit is not None and self.in_flight.get(client, 0) >= limit:
            raise APIError(
                429,
                f"too many requests in flight from this client: at most {limit} (server.limits.per_client)",
                "rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight[client] = self.in_flight.get(client, 0) + 1

        def release() -> None:
            left = self.in_flight.pop(client) - 1
            if left:
                self.in_flight[client] = left

        return release

    # -- engine events (on the event loop) -----------------------------------------------------------

    def on_batch(self, batch: StepBatch) -> None:
        for out in batch.outputs:
            self.frontend.process(out)
        if batch.stats:
            self.metrics.update(batch.stats)
            self.client.stats = batch.stats

    def on_death(self, reason: str) -> None:
        log.error("%s; failing in-flight requests", reason)
        self.frontend.fail_all(reason)

    def begin_shutdown(self) -> None:
        """SIGTERM/SIGINT: refuse new requests and end every open one with an error (streams get an error
        chunk and [DONE]), so connections close at once and the engine can be stopped."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: ending %d open sequence(s)", len(self.frontend.live))
        self.frontend.fail_all("the server is shutting down")

    # -- request life cycle --------------------------------------------------------------------------

    def submit(self, parsed: ParsedRequest) -> tuple[list[TrackedRequest], asyncio.Queue]:
        """Track one request per prompt and send its choices to the engine; their outputs arrive on the
        returned queue."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", "server_error")
        if not self.client.alive:
            raise APIError(503, "the engine is not running", "server_error")
        prompts, params = parsed.prompts, parsed.params
        events: asyncio.Queue[Event] = asyncio.Queue()
        submitted_at = time.perf_counter()

        def sink(choice: Completion, delta: str, out: StepOutput) -> None:
            self.metrics.tokens_arrived(choice.seq_id, len(out.new_token_ids), submitted_at, out.num_cached_tokens)
            if choice.finish_reason is not None:
                self.metrics.sequence_ended(choice.seq_id)
            events.put_nowait((choice, delta, out, choice.finish_reason is not None))

        requests = []
        try:
            for text, ids in prompts:
                req = self.frontend.track(text, ids, params, sink)
                requests.append(req)
                for seq_id, p in req.sequences():
                    self.client.add(seq_id, ids, p)
                self.metrics.request_received(len(ids))
        except BaseException:
            self.abort(requests)
            raise
        return requests, events

    def abort(self, requests: list[TrackedRequest]) -> None:
        for r in requests:
            self.frontend.abort(r)

    async def wait_all(self, requests: list[TrackedRequest], events: asyncio.Queue, request: Request) -> None:
        """Wait until every choice finished; abort if the client goes away first."""
        try:
            while not all(r.finished for r in requests):
                try:
                    await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.abort(requests)
                        return
        except asyncio.CancelledError:
            self.abort(requests)
            raise
        if any(c.finish_reason == "error" for r in requests for c in r.choices):
            if self.shutting_down:
                raise APIError(503, "the server is shutting down", "server_error")
            raise APIError(500, self.client.dead_reason or "the engine failed this request", "server_error")

    # -- responses -----------------------------------------------------------------------------------

    def logprobs(
        self, request: TrackedRequest, chat: bool, token_ids: list[int], logprobs: list[TokenLogprob]
    ) -> dict[str, Any] | None:
        if not request.params.logprobs or not token_ids:
            return None
        return choice_logprobs(self.tokenizer, chat, token_ids, logprobs)

    def response(
        self, requests: list[TrackedRequest], header: ResponseHeader, chat: bool, tools: ToolRequest | None = None
    ) -> dict[str, Any]:
        n = requests[0].params.n
        choices = []
        for ri, r in enumerate(requests):
            for c in r.choices:
                text, calls, reason = c.text.text, [], c.finish_reason
                if tools is not None:
                    text, calls = extract_calls(text, tools)
                    reason = "tool_calls" if calls else reason
                lp = self.logprobs(r, chat, c.token_ids, c.logprobs)
                choices.append(final_choice(ri * n + c.index, chat, text, lp, reason, calls))
        usage = total_usage([r.output().usage for r in requests])
        return header.wrap(object_name(chat, chunk=False), choices, usage=usage_dict(usage))

    async def stream(
        self,
        parsed: ParsedRequest,
        requests: list[TrackedRequest],
        events: asyncio.Queue,
        header: ResponseHeader,
        submitted_at: float,
    ) -> AsyncIterator[str]:
        """The SSE body: a role chunk per chat choice, text deltas (tool calls held back and sent whole at
        the end), an optional usage chunk, [DONE]."""
        choices = StreamedChoices(self, parsed, requests, header)
        try:
            for chunk in choices.opening():
                yield chunk
            # Until every choice's last event is sent: the requests may finish while events are still queued.
            while choices.pending:
                choice, delta, out, last = await events.get()
                if out.error is not None:
                    yield sse(error_body(out.error, "server_error"))
                    self.abort(requests)
                    break
                for chunk in choices.on_event(choice, delta, out, last):
                    yield chunk
            else:
                self.metrics.e2e.observe(time.perf_counter() - submitted_at)
            if parsed.include_usage:
                yield choices.usage()
            yield SSE_DONE
        finally:
            self.abort(requests)  # no-op when all finished; frees KV when the client went away


class StreamedChoices:
    """The chunks of one streamed response: each choice's index in it, its request, and (when tools may be
    called) the text held back until it is known not to be a call."""

    def __init__(self, server: Server, parsed: ParsedRequest, requests: list[TrackedRequest], header: ResponseHeader):
        self.server, self.chat, self.header = server, parsed.chat, header
        n = requests[0].params.n
        self.index = {c.seq_id: ri * n + c.index for ri, r in enumerate(requests) for c in r.choices}
        self.owner = {c.seq_id: r for r in requests for c in r.choices}
        self.held = {seq_id: ToolStream(parsed.tools) for seq_id in self.index} if parsed.tools is not None else {}
        self.pending = set(self.index)
        self.object = object_name(parsed.chat, chunk=True)
        # OpenAI's chunks carry `usage`, null until the last one, when the client asked for it
        self.usage_field = {"usage": None} if parsed.include_usage else {}
        self.requests = requests

    def chunk(self, choice: dict[str, Any]) -> str:
        return sse(self.header.wrap(self.object, [choice], **self.usage_field))

    def opening(self) -> list[str]:
        return [self.chunk(role_choice(i)) for i in self.index.values()] if self.chat else []

    def on_event(self, choice: Completion, delta: str, out: StepOutput, last: bool) -> list[str]:
        i = self.index[choice.seq_id]
        lp = self.server.logprobs(self.owner[choice.seq_id], self.chat, out.new_token_ids, out.new_logprobs)
        reason = choice.finish_reason if last else None
        if last:
            self.pending.discard(choice.seq_id)
        if choice.seq_id in self.held:
            return [self.chunk(p) for p in self._tool_pieces(self.held[choice.seq_id], i, delta, lp, reason)]
        if delta or lp is not None or reason is not None:
            return [self.chunk(delta_choice(i, self.chat, delta, lp, reason))]
        return []

    def usage(self) -> str:
        return sse(
            self.header.wrap(self.object, [], usage=usage_dict(total_usage([r.output().usage for r in self.requests])))
        )

    @staticmethod
    def _tool_pieces(
        held: ToolStream, index: int, delta: str, logprobs: dict[str, Any] | None, reason: str | None
    ) -> list[dict[str, Any]]:
        """A chat choice's chunks for one event when tools may be called: content that cannot be part of a
        call at once; at the end the rest, the calls, and the finish reason (tool_calls if there were any)."""
        pieces = []
        text = held.feed(delta)
        if text or logprobs is not None:
            pieces.append(delta_choice(index, True, text, logprobs, None))
        if reason is not None:
            rest, calls = held.finish()
            if rest:
                pieces.append(delta_choice(index, True, rest, None, None))
            if calls:
                pieces.append(tool_calls_choice(index, calls))
            pieces.append(delta_choice(index, True, "", None, "tool_calls" if calls else reason))
        return pieces


# ------------------------------------------------------------------------------------------- routes


def _server(request: Request) -> Server:
    return request.app.state.server


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over {limit} bytes (server.limits.body_bytes)", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"the request body is over {limit} bytes (server.limits.body_bytes)", code="body_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model_name: str, limits: RequestLimits) -> dict[str, Any]:
    try:
        body = json.loads(await _read_body(request, limits.body_bytes))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:  # the parser's own limit, far below what a hostile body can nest
        raise APIError(400, f"the request body nests deeper than {limits.json_depth}") from None
    if depth(body) > limits.json_depth:
        raise APIError(400, f"the request body nests deeper than {limits.json_depth} (server.limits.json_depth)")
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{model_name}'",
            param="model",
            code="model_not_found",
        )
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise APIError(400, "'stream' must be a boolean", param="stream")
    return body


async def _generate(request: Request, chat: bool) -> Response:
    server = _server(request)
    release = server.admit(request.client.host if request.client else "")
    streaming = False
    try:
        response = await _respond(server, request, chat)
        streaming = isinstance(response, StreamingResponse)
        if streaming:
            response.body_iterator = _released_after(response.body_iterator, release)
        return response
    finally:
        if not streaming:
            release()


async def _released_after(chunks: AsyncIterator[str], release: Callable[[], None]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        release()


async def _respond(server: Server, request: Request, chat: bool) -> Response:
    body = await _parse(request, server.model_name, server.cfg.server.limits)
    info = server.client.info
    parsed = parse_request(body, chat, server.tokenizer, server.cfg.server.limits, info.vocab_size, info.max_model_len)
    header = ResponseHeader.new("chatcmpl" if chat else "cmpl", server.model_name, server.fingerprint)
    submitted_at = time.perf_counter()
    requests, events = server.submit(parsed)
    if parsed.stream:
        chunks = server.stream(parsed, requests, events, header, submitted_at)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await server.wait_all(requests, events, request)
    server.metrics.e2e.observe(time.perf_counter() - submitted_at)
    return JSONResponse(server.response(requests, header, chat, parsed.tools))


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def openapi(request: Request) -> Response:
    server = _server(request)
    return JSONResponse(openapi_document(server.model_name, server.client.info.vocab_size, server.cfg.server.limits))


async def chat_page(request: Request) -> Response:
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def models(request: Request) -> Response:
    server = _server(request)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": server.model_name,
                    "object": "model",
                    "created": server.started,
                    "owned_by": "engine",
                    "max_model_len": server.client.info.max_model_len,
                }
            ],
        }
    )


# What the SGLang model gateway (sglang-router) asks of a worker when it registers it and while it routes: seen
# from sglang-router 0.3.2 (GET /health, /model_info and /server_info on registration, /get_load every 30 s
# under power_of_two), answered in SGLang's shapes.
async def model_info(request: Request) -> Response:
    server = _server(request)
    name = server.model_name
    return JSONResponse({"model_path": name, "tokenizer_path": name, "served_model_name": name, "is_generation": True})


async def server_info(request: Request) -> Response:
    server = _server(request)
    cfg, info = server.cfg, server.client.info
    return JSONResponse(
        {
            "model_path": server.model_name,
            "served_model_name": server.model_name,
            "version": engine.__name__,
            "max_total_num_tokens": info.stats["kv_pages_total"] * cfg.kv_cache.page_size,
            "max_running_requests": cfg.scheduler.max_running_requests,
            "max_model_len": info.max_model_len,
            "page_size": cfg.kv_cache.page_size,
            "tp_size": cfg.parallel.tp,
            "dp_size": 1,
        }
    )


async def get_load(request: Request) -> Response:
    server = _server(request)
    stats = server.client.stats
    used = stats["kv_pages_total"] - stats["kv_pages_free"] - stats["kv_pages_evictable"]
    tokens = used * server.cfg.kv_cache.page_size
    return JSONResponse(
        {
            "dp_rank": 0,
            "num_reqs": stats["running"] + stats["waiting"],
            "num_waiting_reqs": stats["waiting"],
            "num_tokens": tokens,
            "load": tokens,  # the field earlier gateways read
        }
    )


async def health(request: Request) -> Response:
    client = _server(request).client
    if client.alive:
        return JSONResponse({"status": "ok", "engine_pid": client.info.pid, "tp_rank_pids": client.info.tp_rank_pids})
    return JSONResponse({"status": "error", "reason": client.dead_reason or "engine not running"}, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(_server(request).metrics.render(), media_type="text/plain; version=0.0.4")


async def api_error(request: Request, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        error_body(f"{exc.detail}: {request.method} {request.url.path}", kind), status_code=exc.status_code
    )


async def internal_error(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)


ROUTES = [
    Route("/", chat_page, methods=["GET"]),
    Mount("/static", StaticFiles(directory=WEB_DIR), name="static"),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/model_info", model_info, methods=["GET"]),
    Route("/server_info", server_info, methods=["GET"]),
    Route("/get_load", get_load, methods=["GET"]),
]


def create_app(server: Server) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.client.relay(asyncio.get_running_loop(), server.on_batch, server.on_death)
        yield

    api_key = server.cfg.server.api_key
    app = Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={APIError: api_error, HTTPException: http_error, Exception: internal_error},
        middleware=[Middleware(RequireAPIKey, key=api_key)] if api_key else [],
    )
    app.state.server = server
    return app


class RequireAPIKey:
    """Pure ASGI (not BaseHTTPMiddleware, which would buffer streams and hide disconnects)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1/")
            and dict(scope["headers"]).get(b"authorization") != self.expected
        ):
            response = JSONResponse(
                error_body("invalid or missing API key", "invalid_request_error", code="invalid_api_key"),
                status_code=401,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ----------------------------------------------------------------------------------------- start-up


class StartupError(Exception):
    pass


def one_line(e: BaseException) -> str:
    """`e` as one line: the engine's own report as it is, anything else with its type."""
    lines = str(e).strip().splitlines()
    if type(e) is RuntimeError and lines:  # wait_ready's message already names the failure
        return lines[0]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


class GracefulUvicorn(uvicorn.Server):
    """uvicorn, told on SIGINT/SIGTERM to end the open requests first, and not re-raising the signal when
    it is done (uvicorn does, and the re-raised SIGTERM killed this process before it stopped the engine:
    the engine and its ranks were left running)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.on_exit)


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(cfg: EngineConfig) -> None:
    host, port = cfg.server.host, cfg.server.port
    sock = bind(host, port)  # fail on a taken port before spending time on the model
    try:
        source = resolve_model(cfg.model.path)
    except (OSError, ValueError) as e:
        raise StartupError(str(e)) from None
    log.info("starting: model %s on %s; the engine loads it in its own process", source.path, cfg.device)
    # The engine process imports torch and loads the model while this one loads the tokenizer.
    client = EngineClient(cfg)
    client.launch()
    # Whatever fails from here on (an import inside transformers, the tokenizer, the weights, Ctrl-C), the
    # engine must not outlive it: left running, it went on compiling while the server hung with no port open.
    try:
        try:
            tokenizer = load_tokenizer(source)
        except Exception as e:
            raise StartupError(f"cannot load the tokenizer of {source.path}: {one_line(e)}") from None
        try:
            info = client.wait_ready([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        except RuntimeError as e:
            raise StartupError(f"the engine failed to start: {one_line(e)}") from None
    except BaseException as e:
        client.shutdown()
        if isinstance(e, KeyboardInterrupt):
            raise StartupError("interrupted while starting") from None
        raise
    server = Server(cfg, tokenizer, client)
    server.metrics.update(info.stats)
    server.metrics.describe_cache(cfg.kv_cache.page_size, info.stats["kv_pages_total"])
    app = create_app(server)
    mode = cfg.compile.mode if cfg.compile.enabled else "eager"
    log.info(
        "ready: model=%s (%s) dtype=%s kv_pages=%d x %d tokens compile=%s url=http://%s:%d/v1",
        server.model_name,
        source.path,
        cfg.dtype,
        info.stats["kv_pages_total"],
        cfg.kv_cache.page_size,
        mode,
        host,
        port,
    )
    try:
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        GracefulUvicorn(config, on_exit=server.begin_shutdown).run(sockets=[sock])
    finally:
        client.shutdown()
    log.info("stopped")


@hydra.main(config_path="configs", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        serve(EngineConfig.from_dictconfig(cfg))
    except (StartupError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
