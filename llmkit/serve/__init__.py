"""`llmkit serve`: an OpenAI-compatible HTTP server with continuous batching and a chat page.

    from llmkit.serve import build_app, serve
    serve("smollm2-135m-instruct", port=8000)          # blocks; Ctrl-C stops it

Pieces: engine.py (the batching scheduler over llmkit.infer.generate's Decoder), prefill.py (newcomers'
prompts, shared prefixes reused), app.py (routes), openai_stream.py (requests to
jobs, events to OpenAI JSON/SSE), gate.py (auth, body limit, request metrics), metrics.py,
schemas.py (pydantic bodies = the OpenAPI schema), embeddings.py, static/ (the chat page).
"""
from __future__ import annotations

from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.serve.app import create_app
from llmkit.infer.sampling import SamplingParams
from llmkit.serve.engine import Engine

__all__ = ["Engine", "SamplingParams", "build_app", "create_app", "serve", "served_name"]


GENERIC_DIR_NAMES = {"model", "models", "final", "checkpoint", "out", "output", "merged", "hf", "llmkit"}


def served_name(name_or_path: str) -> str:
    """The id clients put in `model`: a short name as given, else the file or directory name,
    with its parent's in front when the name alone says nothing (runs/demo/model -> demo/model)."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path
    if path.is_file():
        return path.stem
    path = path.resolve()
    if path.name.lower() in GENERIC_DIR_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def build_app(model: str | None = "smollm2-135m-instruct", *, embedding_model: str | None = None,
              max_batch: int = 16, max_queue: int = 128, context: int | None = None, timeout: float = 600.0,
              api_key: str | None = None, max_body_bytes: int = 1 << 20, dtype: str | None = None,
              nlu: list[str] | None = None, dialog: str | None = None, name: str | None = None,
              cors_origins: list[str] | None = None, allowed_hosts: list[str] | None = None):
    """Load the models and wire engine and app. `model` may be a decoder (chat/completions) or an
    encoder (then it serves embeddings); `embedding_model` adds an encoder beside a decoder.
    `dtype` is the decoder's (None: as stored, see resolve_model; float32, bfloat16, float16, quantized).
    `nlu` (NLU model dirs) adds
    /v1/classify and /v1/tag, `dialog` (a domain file, with `nlu`) adds /v1/dialog; model="none" serves no decoder.
    `name` replaces the id clients use for `model` (the decoder's, or the encoder's when it is served alone)."""
    from llmkit.serve.embeddings import is_encoder, load_embedder
    from llmkit.serve.origin import check_origins

    check_origins(cors_origins or [])  # before the slow part: a typo fails at once
    engine = embedder = decoder_name = embed_name = None
    if model == "none":
        model = None
    if model is not None and is_encoder(model):
        if embedding_model is not None:
            raise LlmkitError(f"--model {model} is already an embedding model; drop --embedding-model")
        model, embedding_model = None, model
    routes = _app_routes(nlu, dialog, chat_model=model is not None)
    if model is not None:
        from llmkit.io.resolve import resolve_model

        net, tokenizer = resolve_model(model, dtype=dtype)
        engine = Engine(net, tokenizer, max_batch=max_batch, max_queue=max_queue, context=context,
                        timeout=timeout)
        decoder_name = served_name(model)
    if embedding_model is not None:
        embedder = load_embedder(embedding_model)
        embed_name = served_name(embedding_model)
    if name is not None:
        if not name.strip() or name != name.strip():
            raise LlmkitError(f"--name {name!r} must be non-empty, without leading or trailing spaces")
        if engine is not None:
            decoder_name = name
        else:
            embed_name = name
    return create_app(engine, decoder_name or "none", embedder=embedder, embedding_model=embed_name,
                      api_key=api_key, max_body_bytes=max_body_bytes, routes=routes, cors_origins=cors_origins,
                      allowed_hosts=allowed_hosts)


def served_hosts(host: str, extra: list[str] | None = None) -> list[str] | None:
    """The Host names a server bound to `host` answers: on loopback only this machine's names (a
    DNS-rebinding defence, origin.py) plus `extra`; elsewhere any, unless `extra` names some."""
    from llmkit.serve.origin import LOOPBACK, is_loopback

    if is_loopback(host):
        return [*LOOPBACK, host, *(extra or [])]
    return [host, *extra] if extra else None


def _app_routes(nlu_paths, domain_file, chat_model: bool):
    """The NLU / dialogue routes as a callable for create_app, or None when neither is asked for.
    A domain whose replies the chat model words (reply: chat) needs one served (`chat_model`)."""
    if not nlu_paths:
        if domain_file:
            raise LlmkitError("--dialog needs its NLU model: add --nlu MODEL")
        return None
    from llmkit.apps.dialog import Sessions
    from llmkit.apps.domain import load_domain
    from llmkit.apps.nlu import NLU
    from llmkit.serve.apps import add_nlu_routes

    domain = load_domain(domain_file) if domain_file else None
    if domain is not None and domain.reply == "chat" and not chat_model:
        raise LlmkitError(f"{domain_file} has the chat model word its replies (reply: chat): serve one with "
                          "--model (e.g. smollm2-135m-instruct), or set reply: template")
    nlu = NLU.load(*nlu_paths)
    sessions = Sessions(domain, nlu) if domain is not None else None
    return lambda app: add_nlu_routes(app, nlu, sessions)


def serve(model: str | None = "smollm2-135m-instruct", *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", allowed_hosts: list[str] | None = None, **options) -> None:
    """Build the app and run it under uvicorn until interrupted."""
    import sys

    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not options.get("api_key"):
        print(f"warning: serving on {host} without --api-key: anyone who can reach this machine can use it",
              file=sys.stderr)
    app = build_app(model, allowed_hosts=served_hosts(host, allowed_hosts), **options)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
