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

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from qserve.engine_api import Engine, EngineBusy, GenerationEvent, RequestRejected, SamplingParams
from qserve.errors import BudgetError, QServeError
from qserve.server.errors import APIError, error_response
from qserve.server.metrics import Metrics
from qserve.server.schemas import BudgetRequest, ChatCompletionRequest, CompletionRequest, ErrorResponse
from qserve.server.security import BodyLimitMiddleware, SecuritySettings, check_admin, check_api_key
from qserve.tokenizer import encode_chat, encode_text

log = logging.getLogger("qserve.server")

_ERR = {"model": ErrorResponse}
# What each route can answer besides 200, so the OpenAPI schema tells clients the truth.
API_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _ERR | {"description": "Invalid request (malformed JSON, bad values, prompt over context)"},
    401: _ERR | {"description": "Missing or wrong API key"},
    404: _ERR | {"description": "Unknown model"},
    413: _ERR | {"description": "Request body too large"},
    429: _ERR | {"description": "Waiting queue full; retry after Retry-After seconds"},
    503: _ERR | {"description": "Loading, draining or resizing"},
    504: _ERR | {"description": "Request timed out"},
}
GEN_RESPONSES = API_ERRORS | {200: {"description": "A completion, or an SSE stream when stream=true",
                                    "content": {"application/json": {}, "text/event-stream": {}}}}
ADMIN_ERRORS = {401: API_ERRORS[401], 403: _ERR | {"description": "Admin endpoints disabled"}}


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
               security: SecuritySettings | None = None, request_timeout: float | None = None,
               budget: Any = None) -> FastAPI:
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
            # read at scrape time: a variant swap recompiles, a failing compiled step turns eager
            state.metrics.compiled.set_function(lambda: float(engine.compile_status.startswith("on")))
            _set_budget_gauges(state, budget)
            state.ready = True
            log.info("model %s ready (%s, %.1f MB weights, decode step compile: %s)", model_name, info.quant_method,
                     info.weight_bytes / 1e6, engine.compile_status)
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

    sec = security or SecuritySettings()

    def api_key(authorization: str | None = Header(default=None, include_in_schema=False)) -> None:
        check_api_key(sec, authorization)

    def admin(authorization: str | None = Header(default=None, include_in_schema=False)) -> None:
        check_admin(sec, authorization)

    def metrics_key(authorization: str | None = Header(default=None, include_in_schema=False)) -> None:
        if sec.protect_metrics:
            check_api_key(sec, authorization)

    app = FastAPI(title="qserve", version="0.1.0", lifespan=lifespan)
    app.state.qserve = state
    app.add_middleware(BodyLimitMiddleware, limit=sec.max_body_bytes)
    _narrow_schema(app, model_name, engine)
    state.request_timeout = request_timeout

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return error_response(400, msg, code="invalid_value", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            path = request.url.path
            methods = {m for r in app.routes if getattr(r, "methods", None) and r.path_regex.match(path)
                       for m in r.methods}
            headers["Allow"] = ", ".join(sorted(methods))
        return error_response(exc.status_code, str(exc.detail), code=None, headers=headers or None)

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

    @app.get("/ready", responses={503: {"description": "Loading, draining or failed"}})
    async def ready() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready", "model": model_name})
        status = "draining" if state.draining else ("failed" if state.load_error else "loading")
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    @app.get("/metrics", responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
                                     401: API_ERRORS[401]}, dependencies=[Depends(metrics_key)])
    async def metrics() -> Response:
        s = engine.stats() if state.ready else {"running": 0, "waiting": 0}
        state.metrics.running.set(s.get("running", 0))
        state.metrics.waiting.set(s.get("waiting", 0))
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/status", responses=ADMIN_ERRORS, dependencies=[Depends(admin)])
    async def admin_status() -> dict[str, Any]:
        info = engine.info() if state.ready else None
        return {"ready": state.ready, "draining": state.draining, "load_error": state.load_error,
                "stats": engine.stats() if state.ready else {},
                "engine": None if info is None else {k: v for k, v in info.__dict__.items()}}

    @app.get("/admin/memory-budget", responses=ADMIN_ERRORS, dependencies=[Depends(admin)])
    async def get_budget() -> dict[str, Any]:
        if budget is None:
            raise APIError(404, "this engine cannot change its memory budget", code="not_supported")
        return budget.status() | {"weight_bytes": engine.info().weight_bytes if state.ready else 0}

    @app.put("/admin/memory-budget", responses=ADMIN_ERRORS | {400: API_ERRORS[400], 503: API_ERRORS[503]},
             dependencies=[Depends(admin)])
    async def put_budget(req: BudgetRequest) -> dict[str, Any]:
        """Plan for the new budget and switch to it while serving: BitStack blocks are loaded or
        dropped in place; another variant is loaded after running requests drain. New requests
        wait in the queue meanwhile; none fail."""
        from qserve.budget import budget_bytes

        if budget is None:
            raise APIError(404, "this engine cannot change its memory budget", code="not_supported")
        _check_serving(state)
        try:
            n = budget_bytes(req.memory_budget)
            t0 = time.monotonic()
            result = await asyncio.to_thread(budget.resize, engine, n)
        except EngineBusy as e:
            raise APIError(503, str(e), code="resize_timeout", headers={"Retry-After": "5"}) from e
        except BudgetError as e:
            raise APIError(400, str(e), code="budget_too_small", param="memory_budget") from e
        except QServeError as e:
            raise APIError(400, str(e), code="invalid_value", param="memory_budget") from e
        state.metrics.resizes.inc()
        state.metrics.resize_seconds.observe(time.monotonic() - t0)
        _set_budget_gauges(state, budget)
        return result

    @app.get("/v1/models", responses={401: API_ERRORS[401]}, dependencies=[Depends(api_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", responses={401: API_ERRORS[401], 404: API_ERRORS[404]},
             dependencies=[Depends(api_key)])
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions", responses=GEN_RESPONSES, dependencies=[Depends(api_key)])
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        _check_serving(state)
        _check_model(state, req.model)
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in req.messages]
        try:
            prompt_ids = encode_chat(engine.tokenizer, messages)
        except QServeError as e:
            raise APIError(400, str(e), code="invalid_value", param="messages") from e
        for field_name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, field_name)
            if value is not None and value > engine.max_model_len:
                raise APIError(400, f"{field_name} must be at most the context length {engine.max_model_len}",
                               code="invalid_value", param=field_name)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await _generate(state, request, req, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions", responses=GEN_RESPONSES, dependencies=[Depends(api_key)])
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
        echo = engine.tokenizer.decode(prompt_ids, skip_special_tokens=True) if req.echo else ""
        return await _generate(state, request, req, prompt_ids, req.max_tokens or 16, chat=False, echo=echo)

    return app


def _set_budget_gauges(state: ServerState, budget: Any) -> None:
    info = state.engine.info()
    state.metrics.weight_bytes.set(info.weight_bytes)
    if budget is not None:
        state.metrics.budget.set(budget.budget or 0)
        state.metrics.blocks.set(info.extra.get("blocks") or 0)


def _narrow_schema(app: FastAPI, model_name: str, engine: Engine) -> None:
    """The schema states this server's real limits: the one model it serves, max_tokens up to the
    context length, token ids inside the vocabulary. (Prompt + max_tokens over the context is a
    cross-field limit JSON Schema cannot express: that stays a documented 400.)"""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for comp in schema.get("components", {}).get("schemas", {}).values():
                props = comp.get("properties", {})
                if not comp.get("title", "").endswith("Request") or "model" not in props:
                    continue
                props["model"]["enum"] = [model_name]
                for name in ("max_tokens", "max_completion_tokens"):
                    for alt in props.get(name, {}).get("anyOf", []):
                        if alt.get("type") == "integer":
                            alt["maximum"] = engine.max_model_len
                for alt in props.get("prompt", {}).get("anyOf", []):
                    if alt.get("type") == "array" and alt.get("items", {}).get("type") == "integer":
                        alt["items"]["maximum"] = len(engine.tokenizer) - 1
            for op in schema.get("paths", {}).get("/v1/models/{model_id}", {}).values():
                for param in op.get("parameters", []):
                    if param.get("name") == "model_id":
                        param["schema"]["enum"] = [model_name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


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
                    max_tokens: int | None, chat: bool, echo: str = "") -> Response:
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
        return StreamingResponse(_sse(events(), rid, created, state.model_name, chat, include_usage, echo),
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
    choice = {"index": 0, "text": echo + content, "finish_reason": final.finish_reason, "logprobs": None}
    return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                         "model": state.model_name, "choices": [choice], "usage": usage})


async def _sse(events: AsyncIterator[GenerationEvent], rid: str, created: int, model: str, chat: bool,
               include_usage: bool, echo: str = "") -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model,
                                "choices": [choice] if choice else []}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    if chat:
        yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    elif echo:
        yield chunk({"index": 0, "text": echo, "finish_reason": None, "logprobs": None})
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
