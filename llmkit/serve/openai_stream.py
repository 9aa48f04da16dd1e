"""From a validated OpenAI request to engine jobs, and from engine events to OpenAI responses.

Streams are Server-Sent Events in OpenAI's chunk format. Each generated token is
exactly one chunk (its text may be empty while a multi-byte character or a possible
stop string is held back; the last token's chunk carries `finish_reason`), so a
client counting chunks gets the same number as `usage.completion_tokens`.
"""
from __future__ import annotations

import asyncio
import json
import time

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.logprobs import chat_entries, completion_logprobs, score_prompt
from llmkit.infer.structured import grammar_tokenizer, json_grammar
from llmkit.serve import schemas as S
from llmkit.serve import tools
from llmkit.serve.engine import QueueFull

MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy
FAILURES = {"timeout": (408, "timeout_error", "request_timeout"), "error": (500, "server_error", None)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _bad(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def _sse(payload) -> str:
    # ASCII-escaped JSON: generated text may hold U+0085, U+2028 or U+2029, which SSE allows raw
    # but which clients that split lines like str.splitlines (httpx's iter_lines) cut a chunk at
    return f"data: {json.dumps(payload)}\n\n"


class Streamer:
    def __init__(self, engine, model_name: str, metrics):
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.model_name, self.metrics = model_name, metrics

    # ---- prompts ----------------------------------------------------------------

    def completion_prompts(self, prompt) -> list[list[int]]:
        """OpenAI's prompt forms (text, texts, ids, lists of ids) as a list of token-id lists."""
        if isinstance(prompt, str):
            prompts = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not 1 <= len(prompts) <= S.MAX_PROMPTS:
            raise _bad(f"prompt must hold 1 to {S.MAX_PROMPTS} prompts, got {len(prompts)}")
        vocab = self.tokenizer.vocab_size
        out = []
        for p in prompts:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else list(p)
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise _bad(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
            if not ids:  # an empty prompt starts a fresh document
                start = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id
                if start is None:
                    raise _bad("prompt is empty")
                ids = [start]
            out.append(ids)
        return out

    def tool_plan(self, body):
        try:
            return tools.plan(body.tools, body.tool_choice)
        except LlmkitError as e:
            raise _bad(str(e)) from None

    def chat_prompt(self, messages: list[S.ChatMessage], plan=None) -> list[int]:
        native = plan is not None and "tools" in (self.tokenizer.chat_template or "")
        turns = [] if plan is None or native else [{"role": "system", "content": tools.describe(plan.tools)}]
        for i, m in enumerate(messages):
            if m.content is None and not m.tool_calls:
                raise _bad(f"messages.{i}.content is required (only an assistant message with tool_calls may omit it)")
            text = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content or [])
            if m.tool_calls:  # the model's earlier call, as it would have written it
                try:
                    text = "\n".join([text] * bool(text) + [tools.call_text(c) for c in m.tool_calls])
                except LlmkitError as e:
                    raise _bad(f"messages.{i}.{e}") from None
            role = {"developer": "system"}.get(m.role, m.role)
            if role == "tool" and not native:  # templates without a tool role: the result as a user turn
                role, text = "user", f"Result of the function call {m.tool_call_id or ''}: {text}"
            turns.append({"role": role, "content": text})
        try:
            prompt = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                        tools=plan.tools if native else None)
            return self.tokenizer.encode(prompt)
        except LlmkitError as e:
            raise _bad(str(e)) from None

    # ---- one request --------------------------------------------------------------

    def _grammar(self, body, plan=None) -> str | None:
        """response_format or a forced tool call as an llguidance grammar (None: free text). Runs off
        the event loop: the grammar tokenizer is built here on first use, not on the engine thread."""
        fmt = getattr(body, "response_format", None)
        if plan is not None and plan.schema is not None:
            schema = plan.schema
        elif fmt is None or fmt.type == "text":
            return None
        else:
            schema = None
        if fmt is not None and fmt.type == "json_schema" and schema is None:
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise _bad("response_format.json_schema.schema is required for type json_schema")
            schema = fmt.json_schema.schema_
        try:
            grammar = json_grammar(schema)
        except LlmkitError as e:
            raise _bad(f"response_format: {e}") from None
        grammar_tokenizer(self.tokenizer, self.engine.model.config.vocab_size)
        return grammar

    def _params(self, body, prompts: list[list[int]], chat: bool, grammar: str | None = None) -> SamplingParams:
        context = self.engine.context
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise _bad(f"the prompt has {longest} tokens; this model's context is {context} tokens",
                       "context_length_exceeded")
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        if max_tokens is None:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_tokens = context - longest if chat else min(16, context - longest)
        elif longest + max_tokens > context:
            raise _bad(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds this model's context "
                       f"of {context} tokens", "context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if chat and body.top_logprobs is not None and not body.logprobs:
            raise _bad("top_logprobs needs logprobs: true")
        logprobs = (body.top_logprobs or 0 if body.logprobs else None) if chat else body.logprobs
        # top_p = 0 keeps only the most likely token, and a temperature too small for logits / temperature
        # to stay finite is the greedy limit too
        greedy = body.top_p <= 0 or body.temperature < MIN_TEMPERATURE
        return SamplingParams(max_new_tokens=max_tokens, temperature=0.0 if greedy else body.temperature,
                              top_p=None if greedy else body.top_p, stop=tuple(s for s in stop if s),
                              seed=body.seed, ignore_eos=body.ignore_eos, top_k=body.top_k or None,
                              min_p=body.min_p, presence_penalty=body.presence_penalty,
                              frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                              logprobs=logprobs, grammar=grammar)

    def _echoes(self, body, prompts: list[list[int]], params) -> list[tuple[str, list]] | None:
        """Completions with echo: each prompt's text and, with logprobs, its tokens scored."""
        if not getattr(body, "echo", False):
            return None
        top = params.logprobs
        return [(self.tokenizer.decode(p), score_prompt(self.engine.model, p, top) if top is not None else [])
                for p in prompts]

    def _logprobs(self, chat: bool, scored: list, offset: int = 0) -> dict:
        if chat:
            return {"content": chat_entries(self.tokenizer, scored)}
        return completion_logprobs(self.tokenizer, scored, offset)

    async def respond(self, request, body, prompts: list[list[int]], chat: bool, plan=None):
        params = self._params(body, prompts, chat, await run_in_threadpool(self._grammar, body, plan))
        if body.num_beams > 1:
            return await self._beams(body, prompts, params, chat)
        echoes = await run_in_threadpool(self._echoes, body, prompts, params)
        try:
            job = self.engine.submit(prompts, params, n=body.n)
        except QueueFull as e:
            self.metrics.rejected.inc()
            raise ApiError(429, str(e), "rate_limit_error", "queue_full",
                           {"Retry-After": str(e.retry_after)}) from None
        except LlmkitError as e:  # more sequences than the queue can ever hold
            raise _bad(str(e)) from None
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{job.id}", "created": int(time.time()),
                "model": self.model_name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            stream = self._stream(job, head, chat, usage, prompt_tokens, params, echoes, body.n)
            if plan is not None:
                stream = self._stream_tool_calls(stream, plan)
            return StreamingResponse(stream,
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._collect(request, job, head, chat, prompt_tokens, params, echoes, body.n, plan)

    async def _beams(self, body, prompts: list[list[int]], params: SamplingParams, chat: bool):
        """Beam search beside the batching engine (on a worker thread): the best `n` hypotheses per prompt."""
        from starlette.concurrency import run_in_threadpool

        from llmkit.infer.beam import BeamParams, beam_decode, finish_text

        if body.stream:
            raise _bad("num_beams > 1 cannot be streamed; set stream to false")
        try:
            beam = BeamParams(num_beams=body.num_beams, max_new_tokens=params.max_new_tokens,
                              num_return_sequences=body.n)
        except LlmkitError as e:
            raise _bad(str(e)) from None
        ends = sorted(self.engine.stop_ids)
        model, tok = self.engine.model, self.tokenizer
        found = await run_in_threadpool(lambda: [beam_decode(model, p, ends, beam) for p in prompts])
        choices, produced = [], 0
        for hyps in found:
            for h in hyps:
                produced += len(h.tokens)
                text, reason = finish_text(tok, h.tokens, ends, params.stop)
                content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                choices.append({"index": len(choices), **content, "logprobs": None, "finish_reason": reason})
        prompt_tokens = sum(len(p) for p in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(produced)
        return JSONResponse({"id": f"{'chatcmpl' if chat else 'cmpl'}-beam{time.monotonic_ns()}", "created": int(time.time()),
                             "model": self.model_name, "object": "chat.completion" if chat else "text_completion",
                             "choices": choices, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                                                           "total_tokens": prompt_tokens + produced}})

    async def _events(self, job):
        """The job's events until every sequence has finished, timing them for /metrics."""
        last: dict[int, float] = {}
        remaining = job.size
        while remaining:
            ev = await job.events.get()
            if ev.finish == "cancelled":
                return
            now = time.monotonic()
            if ev.token:
                self.metrics.generated_tokens.inc()
                if ev.index in last:
                    self.metrics.inter_token.observe(now - last[ev.index])
                elif not last:
                    self.metrics.ttft.observe(now - job.submitted)
                last[ev.index] = now
            if ev.finish:
                remaining -= 1
            yield ev

    async def _stream(self, job, head: dict, chat: bool, include_usage: bool, prompt_tokens: int, params,
                      echoes, n: int):
        kind = "chat.completion.chunk" if chat else "text_completion"
        produced, spoke, offsets = 0, set(), {}
        try:
            for i in range(job.size if echoes else 0):  # the echoed prompt first, as its own chunk
                text, scored = echoes[i // n]
                logprobs = self._logprobs(False, scored) if params.logprobs is not None else None
                offsets[i] = len(text)
                yield _sse({**head, "object": kind, "choices": [{"index": i, "text": text, "logprobs": logprobs,
                                                                 "finish_reason": None}]})
            async for ev in self._events(job):
                if ev.finish in FAILURES:
                    status, type_, code = FAILURES[ev.finish]
                    yield _sse({"error": {"message": ev.error, "type": type_, "code": code, "param": None}})
                    break
                produced += 1
                logprobs = None
                if ev.logprob is not None:
                    logprobs = self._logprobs(chat, [ev.logprob], offsets.get(ev.index, 0))
                    offsets[ev.index] = offsets.get(ev.index, 0) + len(ev.text)
                if chat:
                    delta = {"content": ev.text} if ev.index in spoke else {"role": "assistant", "content": ev.text}
                    spoke.add(ev.index)
                    choice = {"index": ev.index, "delta": delta, "logprobs": logprobs, "finish_reason": ev.finish}
                else:
                    choice = {"index": ev.index, "text": ev.text, "logprobs": logprobs, "finish_reason": ev.finish}
                yield _sse({**head, "object": kind, "choices": [choice]})
            else:
                if include_usage:
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                             "total_tokens": prompt_tokens + produced}
                    yield _sse({**head, "object": kind, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a client that went away frees its batch rows; a no-op once all finished

    async def _collect(self, request, job, head: dict, chat: bool, prompt_tokens: int, params, echoes, n: int,
                       plan=None):
        texts: dict[int, list[str]] = {i: [] for i in range(job.size)}
        scored: dict[int, list] = {i: [] for i in range(job.size)}
        finish: dict[int, str] = {}
        produced = 0
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, job))
        try:
            async for ev in self._events(job):
                if ev.finish in FAILURES:
                    status, type_, code = FAILURES[ev.finish]
                    raise ApiError(status, ev.error, type_, code)
                produced += ev.token
                texts[ev.index].append(ev.text)
                if ev.logprob is not None:
                    scored[ev.index].append(ev.logprob)
                if ev.finish:
                    finish[ev.index] = ev.finish
        finally:
            watcher.cancel()
            job.cancel()
        if len(finish) < job.size:  # the client left; nobody reads this
            return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                           "code": "cancelled", "param": None}}, status_code=400)
        choices = []
        for i in range(job.size):
            text = "".join(texts[i])
            echo, echo_scored = echoes[i // n] if echoes else ("", [])
            logprobs = self._logprobs(chat, echo_scored + scored[i]) if params.logprobs is not None else None
            call = tools.parse_call(text, plan) if plan is not None else None
            if call is not None:
                choices.append({"index": i, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                "logprobs": logprobs, "finish_reason": "tool_calls"})
            elif chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": echo + text, "logprobs": logprobs, "finish_reason": finish[i]})
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": produced,
                 "total_tokens": prompt_tokens + produced}
        return JSONResponse({**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": choices, "usage": usage})

    @staticmethod
    async def _stream_tool_calls(chunks, plan):
        """With tools, a reply's text is held until it ends: then it goes out as one tool-call delta
        (and a finish_reason "tool_calls" chunk) if it is a call, else as its text."""
        held: dict[int, list] = {}
        try:
            async for sse in chunks:
                payload = json.loads(sse[6:]) if sse.startswith("data: {") else None
                if payload is None or not payload.get("choices"):
                    yield sse
                    continue
                choice = payload["choices"][0]
                held.setdefault(choice["index"], []).append(choice["delta"].get("content") or "")
                if choice["finish_reason"] is None:
                    continue
                text = "".join(held.pop(choice["index"]))
                call = tools.parse_call(text, plan)
                if call is None:
                    choice["delta"] = {"role": "assistant", "content": text}
                    yield _sse(payload)
                    continue
                choice["delta"] = {"role": "assistant", "tool_calls": [{"index": 0, **call}]}
                choice["finish_reason"] = None
                yield _sse(payload)
                yield _sse({**payload, "choices": [{**choice, "delta": {}, "finish_reason": "tool_calls"}]})
        finally:
            await chunks.aclose()  # frees the batch rows at once if the client left

    @staticmethod
    async def _cancel_on_disconnect(request, job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return
