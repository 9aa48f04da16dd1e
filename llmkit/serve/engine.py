"""The scheduler: continuous batching of concurrent requests over one decoder KV cache.

One thread owns the model. Between two decode steps it drops sequences whose client
left or whose time ran out, admits waiting ones into free rows of the KV cache (prefill.py
computes their prompts' keys/values, which are copied into those rows), then advances every
active row by one token with llmkit.infer.generate's Decoder.step: each row of the cache keeps its
own length, so rows of any age decode together. Sampling and text (stop strings, stop tokens,
incremental detokenization) are llmkit.infer.generate's too.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams, sample
from llmkit.infer.generate import Completion, Decoder
from llmkit.infer.cpu import optimize_for_inference
from llmkit.infer.logprobs import token_logprobs
from llmkit.serve.prefill import Prefiller
from llmkit.serve.sampling import process as process_logits

log = logging.getLogger("llmkit.serve")
INITIAL_SLOTS = 256  # KV cache length allocated first; it doubles on demand up to the context


@dataclass
class Event:
    """One generated token of sequence `index` (token=True), and/or the end of that sequence."""
    index: int
    text: str = ""
    token: bool = False
    finish: str | None = None   # stop | length | timeout | error | cancelled
    error: str | None = None
    logprob: tuple | None = None  # (token, logprob, [(id, logprob)] alternatives) if asked for


class QueueFull(Exception):
    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Job:
    """One HTTP request: its sequences' events arrive, in order, on one asyncio queue."""

    def __init__(self, engine: "Engine", size: int, timeout: float | None):
        self.id = uuid.uuid4().hex[:24]
        self.engine, self.size = engine, size
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout if timeout else None
        self.cancelled = False  # written on the event loop, read by the engine thread

    def emit(self, event: Event) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled = True

    def cancel(self) -> None:
        """Called on the event loop: the engine frees this job's rows before its next step."""
        if not self.cancelled:
            self.cancelled = True
            self.events.put_nowait(Event(-1, finish="cancelled"))
            self.engine.wake()


class Sequence:
    def __init__(self, job: Job, index: int, prompt: list[int], params: SamplingParams, tokenizer, stop_ids):
        self.job, self.index, self.prompt, self.params = job, index, prompt, params
        # text, stop strings and stop tokens, as llmkit.infer.generate handles them
        self.completion = Completion(tokenizer, prompt, params.stop, () if params.ignore_eos else stop_ids)
        # a seeded request draws from its own generator, so other requests cannot change its tokens
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + index) % 2 ** 64)
        self.generated = 0
        self.output: list[int] = []  # generated ids, for the penalties
        self.scored = None           # logprobs of the token just sampled
        self.constraint = None       # grammar state, made on the engine thread when first needed
        self.pending = -1   # last sampled token, fed to the next decode step
        self.row = -1


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 128,
                 context: int | None = None, timeout: float | None = 600.0, prefill_budget: int = 2048):
        if max_batch < 1 or max_queue < 1:
            raise LlmkitError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be at least 1")
        self.model = optimize_for_inference(model.eval())
        self.tokenizer = tokenizer
        block = model.config.block_size
        self.context = min(context or block, block)
        self.max_batch, self.max_queue, self.timeout = max_batch, max_queue, timeout
        self.prefill_budget = prefill_budget  # prompt tokens admitted per step, so running streams keep flowing
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []
        self._admitting: list[Sequence] = []
        self.decoder: Decoder | None = None  # its cache holds the live rows 0..len(_rows)-1; made on demand
        self._prefiller = Prefiller(self.model)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self._generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))

    # ---- event-loop side -------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._rows)

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int = 1) -> Job:
        """Queue `n` sequences per prompt (event index = prompt_index * n + choice). Call on the event loop."""
        size = len(prompts) * n
        for prompt in prompts:
            if not prompt or len(prompt) + params.max_new_tokens > self.context or params.max_new_tokens < 1:
                raise LlmkitError(f"a prompt of {len(prompt)} tokens + max_tokens={params.max_new_tokens} does not fit "
                                  f"the context of {self.context} tokens (each needs at least one)")
        if size > self.max_queue:
            raise LlmkitError(f"{size} sequences in one request exceed the queue size of {self.max_queue}")
        with self._cv:
            if len(self._waiting) + size > self.max_queue:
                raise QueueFull(f"server busy: {len(self._waiting)} sequences already waiting; retry later")
            job = Job(self, size, self.timeout)
            for i, prompt in enumerate(prompts):
                for j in range(n):
                    self._waiting.append(Sequence(job, i * n + j, prompt, params, self.tokenizer,
                                                  self.stop_ids))
            self._cv.notify()
        return job

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="llmkit-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._cv:
                self._stopping = True
                self._cv.notify()
            self._thread.join()
            self._thread = None

    # ---- engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._rows):
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a bug, or out of memory: fail the batch, keep serving
                log.exception("engine step failed")
                for seq in {id(s): s for s in self._rows + self._admitting}.values():
                    seq.job.emit(Event(seq.index, finish="error", error=f"generation failed: {e}"))
                self._rows, self._admitting = [], []
                self.decoder = None
                self._prefiller.reset()

    def _step(self) -> None:
        self._drop_gone()
        self._admit()
        if self._rows:
            self._decode()

    def _drop_gone(self) -> None:
        """Free the rows and queue places of cancelled or timed-out sequences."""
        now = time.monotonic()

        def gone(seq: Sequence) -> bool:
            if seq.job.cancelled:
                return True
            if seq.job.deadline is not None and now > seq.job.deadline:
                seq.job.emit(Event(seq.index, finish="timeout",
                                   error=f"request timed out after {self.timeout:g} s"))
                return True
            return False

        for seq in [s for s in self._rows if gone(s)]:
            self._free(seq)
        with self._cv:
            if any(s.job.cancelled or s.job.deadline is not None for s in self._waiting):
                self._waiting = deque(s for s in self._waiting if not gone(s))

    def _admit(self) -> None:
        """Move waiting sequences into free rows, within this step's prompt-token budget."""
        groups, budget, free = [], self.prefill_budget, self.max_batch - len(self._rows)
        with self._cv:
            while self._waiting and free > 0:
                first = self._waiting[0]
                if groups and len(first.prompt) > budget:
                    break  # this step's prefill budget is spent; decode first
                group = [self._waiting.popleft()]
                # the n choices of one prompt share a single prefill
                while (self._waiting and len(group) < free and self._waiting[0].job is first.job
                       and self._waiting[0].prompt is first.prompt):
                    group.append(self._waiting.popleft())
                groups.append(group)
                budget -= len(first.prompt)
                free -= len(group)
        if groups:
            # neither queued nor in the batch while prefilling: a failure must still reach them
            self._admitting = [seq for group in groups for seq in group]
            self._prefill(groups)
            self._admitting = []

    def _reserve(self, slots: int) -> None:
        """Make the cache hold `slots` tokens per row: allocated at first use, doubled when outgrown."""
        if self.decoder is None:
            size = min(self.context, max(slots, INITIAL_SLOTS))
            self.decoder = Decoder(self.model, self.max_batch, size)
        elif slots > self.decoder.cache.max_len:
            size = min(self.context, max(slots, 2 * self.decoder.cache.max_len))
            self.decoder.cache = self.decoder.cache.resized(size)

    def _prefill(self, groups: list[list[Sequence]]) -> None:
        logits, sources = self._prefiller([group[0].prompt for group in groups])
        self._reserve(max(len(g[0].prompt) for g in groups) + 1)
        joined, source = [], []
        for i, group in enumerate(groups):
            for seq in group:
                seq.row = len(self._rows)
                self._rows.append(seq)
                self.decoder.cache.copy_row(seq.row, *sources[i], len(seq.prompt))
                joined.append(seq)
                source.append(i)
        tokens = self._sample(logits[source], joined)
        for seq, token in zip(joined, tokens):
            self._accept(seq, token)

    def _decode(self) -> None:
        rows = list(self._rows)
        self._reserve(max(self.decoder.cache.lengths[:len(rows)]) + 1)
        logits = self.decoder.step(torch.tensor([s.pending for s in rows]))
        self.steps += 1
        tokens = self._sample(logits, rows)
        for seq, token in zip(rows, tokens):
            self._accept(seq, token)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """infer.sampling.sample over rows that share settings and a generator, in one call per group."""
        groups: dict = {}
        for i, seq in enumerate(seqs):
            p = seq.params
            key = i if seq.generator is not None else (p.temperature, p.top_k, p.top_p, p.repetition_penalty)
            groups.setdefault(key, []).append(i)
        raw = logits.float()
        logits = process_logits(raw, seqs, lambda p: p.temperature, self.tokenizer)  # penalties, min-p, grammar
        tokens = [0] * len(seqs)
        for rows in groups.values():
            p, gen = seqs[rows[0]].params, seqs[rows[0]].generator or self._generator
            picked = sample(logits[rows], p, gen)  # no history: the repetition penalty is process_logits'
            for i, token in zip(rows, picked.tolist()):
                tokens[i] = token
        for i, seq in enumerate(seqs):
            if seq.params.logprobs is not None:
                seq.scored = token_logprobs(raw[i], tokens[i], seq.params.logprobs)
        return tokens

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated += 1
        seq.output.append(token)
        if seq.constraint is not None:
            seq.constraint.advance(token)
        text = seq.completion.push(token, last=seq.generated >= seq.params.max_new_tokens)
        finish = seq.completion.finish_reason
        seq.job.emit(Event(seq.index, text, token=True, finish=finish, logprob=seq.scored))
        if finish:
            self._free(seq)
        else:
            seq.pending = token

    def _free(self, seq: Sequence) -> None:
        """Leave the batch; the last row moves into the hole so live rows stay packed."""
        last = self._rows.pop()
        cache = self.decoder.cache
        if last is not seq:
            cache.copy_row(seq.row, cache, last.row, cache.lengths[last.row])
            last.row = seq.row
            self._rows[seq.row] = last
        cache.lengths[len(self._rows)] = 0
        seq.row = -1
        if not self._rows and cache.max_len > INITIAL_SLOTS:
            self.decoder = None  # give back the memory a long request grew
