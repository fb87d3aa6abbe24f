"""The FastAPI application: OpenAI-compatible routes over any qserve Engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from qserve.engine_api import Engine, EngineBusy, GenerationEvent, RequestRejected, SamplingParams
from qserve.errors import QServeError
from qserve.server.errors import APIError, error_response
from qserve.server.metrics import Metrics
from qserve.server.schemas import ChatCompletionRequest, CompletionRequest
from qserve.server.security import SecurityMiddleware, SecuritySettings
from qserve.tokenizer import encode_chat, encode_text

log = logging.getLogger("qserve.server")


@dataclass
class ServerState:
    engine: Engine
    model_name: str
    metrics: Metrics = field(default_factory=Metrics)
    ready: bool = False
    draining: bool = False
    load_error: str | None = None
    request_timeout: float | None = None
    created: int = field(default_factory=lambda: int(time.time()))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def create_app(engine: Engine, model_name: str, start_engine: bool = True,
               on_load_error: Callable[[str], None] | None = None,
               security: SecuritySettings | None = None, request_timeout: float | None = None) -> FastAPI:
    """The app loads the engine in the background after start-up, so /health answers at once and
    /ready turns 200 when the model is in memory. `on_load_error` lets the CLI exit non-zero."""
    state = ServerState(engine, model_name)

    async def _load() -> None:
        try:
            await asyncio.to_thread(engine.start)
            info = engine.info()
            state.metrics.weight_bytes.set(info.weight_bytes)
            state.metrics.kv_bytes.set(info.kv_cache_bytes)
            state.metrics.quant.labels(model_name, info.quant_method, info.engine, info.dtype).set(1)
            state.ready = True
            log.info("model %s ready (%s, %.1f MB weights)", model_name, info.quant_method, info.weight_bytes / 1e6)
        except QServeError as e:
            state.load_error = str(e)
            log.error("model failed to load: %s", e)
            if on_load_error is not None:
                on_load_error(str(e))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load()) if start_engine else None
        if not start_engine:
            state.ready = True
        yield
        state.draining = True
        state.ready = False
        if task is not None:
            await task
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="qserve", version="0.1.0", lifespan=lifespan)
    app.state.qserve = state
    app.add_middleware(SecurityMiddleware, settings=security or SecuritySettings())
    state.request_timeout = request_timeout

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return error_response(400, msg, code="invalid_value", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=None)

    @app.exception_handler(APIError)
    async def _on_api(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _on_any(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal server error", code="internal_error")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/"):
            state.metrics.requests.labels(path, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "model": model_name})
        status = "draining" if state.draining else ("failed" if state.load_error else "loading")
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        s = engine.stats() if state.ready else {"running": 0, "waiting": 0}
        state.metrics.running.set(s.get("running", 0))
        state.metrics.waiting.set(s.get("waiting", 0))
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/status")
    async def admin_status() -> dict[str, Any]:
        info = engine.info() if state.ready else None
        return {"ready": state.ready, "draining": state.draining, "load_error": state.load_error,
                "stats": engine.stats() if state.ready else {},
                "engine": None if info is None else {k: v for k, v in info.__dict__.items()}}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        _check_serving(state)
        _check_model(state, req.model)
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in req.messages]
        try:
            prompt_ids = encode_chat(engine.tokenizer, messages)
        except QServeError as e:
            raise APIError(400, str(e), code="invalid_value", param="messages") from e
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await _generate(state, request, req, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        _check_serving(state)
        _check_model(state, req.model)
        p = req.prompt
        if isinstance(p, list) and isinstance(p[0], int):
            vocab = len(engine.tokenizer)
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", code="invalid_value", param="prompt")
            prompt_ids = list(p)
        else:
            prompt_ids = encode_text(engine.tokenizer, p[0] if isinstance(p, list) else p)
        return await _generate(state, request, req, prompt_ids, req.max_tokens or 16, chat=False)

    return app


def _model_card(state: ServerState) -> dict[str, Any]:
    card: dict[str, Any] = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qserve"}
    if state.ready:
        info = state.engine.info()
        card |= {"max_model_len": info.max_model_len, "quant_method": info.quant_method}
    return card


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{state.model_name}'",
                       code="model_not_found", param="model")


def _check_serving(state: ServerState) -> None:
    if state.draining:
        raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "5"})
    if not state.ready:
        msg = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise APIError(503, msg, code="not_ready", headers={"Retry-After": "5"})


async def _generate(state: ServerState, request: Request, req: Any, prompt_ids: list[int],
                    max_tokens: int | None, chat: bool) -> Response:
    engine = state.engine
    limit = engine.max_model_len
    if len(prompt_ids) >= limit:
        raise APIError(400, f"This model's maximum context length is {limit} tokens, but the prompt has "
                       f"{len(prompt_ids)} tokens", code="context_length_exceeded", param="messages" if chat else "prompt")
    if max_tokens is None:
        max_tokens = limit - len(prompt_ids)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=max(req.top_k, 0), seed=req.seed, stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos,
    )
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    try:
        handle = engine.submit(rid, prompt_ids, params)
    except RequestRejected as e:
        raise APIError(400, str(e), code="context_length_exceeded", param="max_tokens") from e
    except EngineBusy as e:
        raise APIError(e.status, str(e), code="overloaded",
                       headers={"Retry-After": str(max(1, round(e.retry_after)))}) from e
    m = state.metrics
    m.prompt_tokens.inc(len(prompt_ids))
    created = int(time.time())
    t0 = time.monotonic()

    timeout = state.request_timeout

    async def events() -> AsyncIterator[GenerationEvent]:
        last = None
        try:
            async with asyncio.timeout(timeout):
                async for ev in handle:
                    now = time.monotonic()
                    if ev.token_ids:
                        m.generation_tokens.inc(len(ev.token_ids))
                        if last is None:
                            m.ttft.observe(now - t0)
                        else:
                            m.itl.observe(now - last)
                        last = now
                    yield ev
            m.e2e.observe(time.monotonic() - t0)
        finally:
            if not handle.finished:  # client went away, timed out, or the server is stopping
                handle.cancel()
                m.aborted.inc()

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(events(), rid, created, state.model_name, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def watch_disconnect() -> None:
        while not handle.finished:
            if await request.is_disconnected():
                handle.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch_disconnect())
    text, final = [], None
    try:
        async for ev in events():
            text.append(ev.text)
            final = ev
    except TimeoutError:
        raise APIError(504, f"the request did not finish within {timeout} s", code="timeout") from None
    finally:
        watcher.cancel()
    assert final is not None
    if final.finish_reason == "error":
        raise APIError(500, final.error or "generation failed", code="internal_error")
    usage = {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
             "total_tokens": final.prompt_tokens + final.completion_tokens}
    content = "".join(text)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": content},
                  "finish_reason": final.finish_reason, "logprobs": None}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": state.model_name, "choices": [choice], "usage": usage})
    choice = {"index": 0, "text": content, "finish_reason": final.finish_reason, "logprobs": None}
    return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                         "model": state.model_name, "choices": [choice], "usage": usage})


async def _sse(events: AsyncIterator[GenerationEvent], rid: str, created: int, model: str, chat: bool,
               include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                "choices": [choice] if choice else []}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    if chat:
        yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    final = None

    def error_chunk(message: str, code: str) -> bytes:
        err = {"error": {"message": message, "type": "internal_server_error", "code": code, "param": None}}
        return f"data: {json.dumps(err)}\n\n".encode()

    try:
        async for ev in events:
            final = ev
            if ev.finish_reason == "error":
                yield error_chunk(ev.error or "generation failed", "internal_error")
                break
            if not (ev.text or ev.finish_reason):
                continue
            if chat:
                delta = {"content": ev.text} if ev.text else {}
                yield chunk({"index": 0, "delta": delta, "finish_reason": ev.finish_reason, "logprobs": None})
            else:
                yield chunk({"index": 0, "text": ev.text, "finish_reason": ev.finish_reason, "logprobs": None})
    except TimeoutError:
        yield error_chunk("the request did not finish within its time limit", "timeout")
    if include_usage and final is not None:
        usage = {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.completion_tokens,
                 "total_tokens": final.prompt_tokens + final.completion_tokens}
        yield chunk({}, usage)
    yield b"data: [DONE]\n\n"
