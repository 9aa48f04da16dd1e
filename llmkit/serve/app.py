"""The HTTP server: OpenAI-compatible routes over the batching engine, plus the chat page.

Every failure a client can cause comes back as a 4xx with OpenAI's error body
{"error": {"message", "type", "code", "param"}}; generation itself runs on the
engine's thread, so the event loop only parses, validates and streams.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmkit.errors import LlmkitError
from llmkit.serve import schemas as S
from llmkit.serve.gate import Gate
from llmkit.serve.metrics import Metrics
from llmkit.serve.openai_stream import ApiError, Streamer
from llmkit.serve.origin import guard

log = logging.getLogger("llmkit.serve")
STATIC = Path(__file__).parent / "static"
ERRORS = {code: {"model": S.ErrorResponse} for code in (400, 401, 404, 413, 429)}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, type_: str, code: str | None, headers=None, param=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, "param": param}},
                        status_code=status, headers=headers)


# Fields whose value may take several shapes: pydantic reports one error per shape, none of
# which names the problem; say what the field accepts instead.
UNION_FIELDS = {"prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
                "input": "a non-empty string or a list of strings", "stop": "a string or a list of strings",
                "content": "a string or a list of text parts"}


def _clean_loc(loc) -> list[str]:
    """A field path without "body" and without pydantic's union-branch tags (str, list[int], ...)."""
    return [str(p) for p in loc if p != "body" and not ("[" in str(p) or str(p) in ("str", "int", "float", "bool"))]


def _validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) for the most telling problem in a request body: an unknown field, else a
    wrong value (too short, out of range), else a wrong type, said per field rather than per shape."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    if errors[0].get("type") == "json_invalid":
        return "request body is not valid JSON", None
    extra = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if extra is not None:
        where = ".".join(_clean_loc(extra["loc"]))
        return f"unknown field {where!r}: this server does not implement it", where
    value_error = next((e for e in errors if not str(e.get("type", "")).endswith("_type")), None)
    chosen = value_error or errors[0]
    loc = _clean_loc(chosen.get("loc", ()))
    union = next((i for i, p in enumerate(loc) if p in UNION_FIELDS), None)
    if value_error is None and union is not None and len(errors) > 1:
        field = ".".join(loc[:union + 1])
        return f"{field}: must be {UNION_FIELDS[loc[union]]}", field
    where = ".".join(loc) or "body"
    return f"{where}: {chosen.get('msg', 'invalid value')}", where


class Served:
    """What this server answers for: its model names (a decoder, an embedder, or both) and their cards."""

    def __init__(self, engine, model_name: str, embedding_model: str | None, embeds: bool):
        self.engine, self.model_name, self.embedding_model = engine, model_name, embedding_model
        self.names = ([model_name] if engine is not None else []) + ([embedding_model] if embeds else [])
        self.started = int(time.time())

    def card(self, name: str) -> dict:
        out = {"id": name, "object": "model", "created": self.started, "owned_by": "llmkit"}
        if self.engine is not None and name == self.model_name:
            out["context_length"] = self.engine.context  # prompt + completion tokens one request may use
        return out

    def check(self, name: str, wanted: str | None, purpose: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"model {name!r} is not served here; try one of {self.names}",
                           "not_found_error", "model_not_found")
        if name != wanted:
            raise ApiError(400, f"model {name!r} cannot {purpose}; {wanted!r} can",
                           "invalid_request_error", "model_not_supported")


def create_app(engine=None, model_name: str = "llmkit", *, embedder=None, embedding_model: str | None = None,
               api_key: str | None = None, max_body_bytes: int = 1 << 20, routes=None,
               cors_origins: list[str] | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The ASGI app. `engine` (an Engine, started and stopped with the app) serves completions;
    `embedder(texts) -> (float32 array (N, D), token count)` serves /v1/embeddings as `embedding_model`;
    `routes(app)` adds more (the NLU and dialogue routes of llmkit.serve.apps). `cors_origins` opens
    the API to those browser origins; `allowed_hosts` (None: any) are the only Host names answered (origin.py)."""
    if engine is None and embedder is None and routes is None:
        raise LlmkitError("nothing to serve: give a decoder model, an embedding model, or both")
    metrics = Metrics(engine)
    served = Served(engine, model_name, embedding_model, embedder is not None)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine is not None:
            engine.start()
        try:
            yield
        finally:
            if engine is not None:
                engine.stop()

    app = FastAPI(title="llmkit", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions, chat and embeddings from an llmkit model.")
    app.state.engine, app.state.metrics = engine, metrics
    _error_handlers(app)
    _info_routes(app, served, metrics)
    if engine is not None:
        _generation_routes(app, served, Streamer(engine, model_name, metrics))
    if embedder is not None:
        _embedding_route(app, served, embedder, metrics)
    if routes is not None:
        routes(app)
    app.openapi = lambda: _openapi(app, served)
    # Outermost but for Starlette's error middleware: refused requests cost no parsing, all are counted.
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics)
    guard(app, cors_origins=cors_origins, allowed_hosts=allowed_hosts)  # outside the Gate: preflights need no key
    return app


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        message, param = _validation_error(exc)
        return _error(400, message, "invalid_request_error", "invalid_value", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
                      None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal server error", "server_error", None)


def _info_routes(app: FastAPI, served: Served, metrics: Metrics) -> None:
    """The chat page, health, Prometheus metrics and the model list."""
    engine = served.engine

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        busy = {"active": engine.active_count, "queued": engine.queue_depth} if engine is not None else {}
        return {"status": "ok", "models": served.names, **busy}

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", response_model=S.ModelList, responses=ERRORS)
    async def list_models():
        return JSONResponse({"object": "list", "data": [served.card(m) for m in served.names]})

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard, responses=ERRORS)
    async def get_model(model_id: str):
        if model_id not in served.names:
            raise ApiError(404, f"model {model_id!r} is not served here", "not_found_error", "model_not_found")
        return JSONResponse(served.card(model_id))


def _generation_routes(app: FastAPI, served: Served, streamer: Streamer) -> None:
    @app.post("/v1/completions", response_model=S.CompletionResponse, responses=ERRORS)
    async def completions(body: S.CompletionRequest, request: Request):
        served.check(body.model, served.model_name, "generate text")
        prompts = await run_in_threadpool(streamer.completion_prompts, body.prompt)
        return await streamer.respond(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions", response_model=S.ChatResponse, responses=ERRORS)
    async def chat_completions(body: S.ChatRequest, request: Request):
        served.check(body.model, served.model_name, "generate text")
        plan = streamer.tool_plan(body)
        prompt = await run_in_threadpool(streamer.chat_prompt, body.messages, plan)
        return await streamer.respond(request, body, [prompt], chat=True, plan=plan)


def _embedding_route(app: FastAPI, served: Served, embedder, metrics: Metrics) -> None:
    @app.post("/v1/embeddings", response_model=S.EmbeddingResponse, responses=ERRORS)
    async def embeddings(body: S.EmbeddingRequest):
        served.check(body.model, served.embedding_model, "embed text")
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            vectors, n_tokens = await run_in_threadpool(embedder, texts)
        except LlmkitError as e:
            raise ApiError(400, str(e), "invalid_request_error", "invalid_value") from None
        vectors = np.asarray(vectors, dtype=np.float32)
        if body.encoding_format == "base64":  # what the official client asks for by default
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        metrics.prompt_tokens.inc(n_tokens)
        return JSONResponse({
            "object": "list", "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        })


def _openapi(app: FastAPI, served: Served) -> dict:
    """FastAPI's schema, plus the served model names as the `model` field's enum (documentation:
    the handlers still answer an unknown name with OpenAI's 404 model_not_found)."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        names = {"CompletionRequest": [served.model_name], "ChatRequest": [served.model_name],
                 "EmbeddingRequest": [served.embedding_model]}
        for request_schema, models in names.items():
            if request_schema in schema["components"]["schemas"]:
                schema["components"]["schemas"][request_schema]["properties"]["model"]["enum"] = models
    return app.openapi_schema
