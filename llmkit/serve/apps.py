"""NLU and dialogue routes: /v1/classify, /v1/tag (the NLU models) and /v1/dialog (a session per conversation).

    POST /v1/classify {"input": "table for 4"}                   -> {"data": [{"index", "label", "score"}]}
    POST /v1/tag      {"input": ["table for 4", ...]}            -> {"data": [{"index", "words", "tags", "slots"}]}
    POST /v1/dialog   {"message": "hi", "session_id": optional}  -> {"session_id", "reply", "act", "state", "action"}
The first /v1/dialog call without a session_id opens a session; later calls pass the id back. When the domain
file says `reply: chat`, the served chat model words each reply (greedy, through the batching engine).
"""
from __future__ import annotations

import threading
from dataclasses import asdict
from typing import Union

from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from llmkit.errors import LlmkitError
from llmkit.serve.openai_stream import ApiError
from llmkit.serve.schemas import Text, Texts


class NluRequest(BaseModel):
    input: Union[Text, Texts] = Field(..., description="one text or a list of texts")


class DialogRequest(BaseModel):
    message: Text = Field(..., min_length=1, max_length=2000)
    session_id: str | None = Field(None, max_length=64)


def add_nlu_routes(app, nlu=None, sessions=None) -> None:
    """Mount the routes the given parts support (an NLU, and/or dialogue Sessions)."""
    lock = threading.Lock()  # sessions are plain dicts: one turn at a time

    async def parse(body: NluRequest) -> list[dict]:
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            return await run_in_threadpool(nlu.parse, texts)
        except LlmkitError as e:
            raise ApiError(400, str(e), "invalid_request_error", "invalid_value") from None

    if nlu is not None and nlu.intents:
        @app.post("/v1/classify")
        async def classify(body: NluRequest):
            rows = await parse(body)
            return {"object": "list", "data": [{"index": i, "label": r["intent"], "score": r["score"]}
                                               for i, r in enumerate(rows)]}

    if nlu is not None and nlu.slot_types:
        @app.post("/v1/tag")
        async def tag(body: NluRequest):
            rows = await parse(body)
            return {"object": "list", "data": [{"index": i, "words": r["words"], "tags": r["tags"],
                                                "slots": r["slots"]} for i, r in enumerate(rows)]}

    if sessions is not None:
        def run_turn(session_id, message):
            with lock:
                return sessions.turn(session_id, message)

        @app.post("/v1/dialog")
        async def dialog(body: DialogRequest):
            try:
                session_id, turn = await run_in_threadpool(run_turn, body.session_id, body.message)
            except LlmkitError as e:
                status = 404 if body.session_id is not None and "unknown session" in str(e) else 400
                raise ApiError(status, str(e), "not_found_error" if status == 404 else "invalid_request_error",
                               "invalid_value") from None
            if sessions.domain.reply == "chat":
                turn.reply = await worded(app.state.engine, turn.reply, turn.state["slots"])
            return {"session_id": session_id, **asdict(turn)}


async def worded(engine, message: str, slots: dict, max_new_tokens: int = 60) -> str:
    """The chat model's wording of the policy's `message` (as `llmkit dialog --reply chat` asks for it)."""
    from llmkit.apps.dialog import CHAT_SYSTEM, chat_request
    from llmkit.infer.generate import SamplingParams
    from llmkit.serve.engine import QueueFull

    turns = [{"role": "system", "content": CHAT_SYSTEM}, {"role": "user", "content": chat_request(message, slots)}]
    prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(turns, add_generation_prompt=True))
    try:
        job = engine.submit([prompt], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", "queue_full", {"Retry-After": str(e.retry_after)}) from None
    pieces = []
    while True:
        event = await job.events.get()
        pieces.append(event.text)
        if event.finish in ("error", "timeout"):
            raise ApiError(503, f"the chat model could not word the reply ({event.error or event.finish})",
                           "server_error", event.finish)
        if event.finish:
            return "".join(pieces).strip() or message
