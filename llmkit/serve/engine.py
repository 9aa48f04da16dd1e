"""The scheduler: continuous batching of concurrent requests over one decoder KV cache.

One thread owns the model. Between two decode steps it drops sequences whose client
left or whose time ran out, admits waiting ones into free batch rows, then advances
every active row by one token in a single forward pass.

Cache layout. The batch shares one write position P (the model's KVCache.pos). Row r
holds its sequence's `length` cached tokens right-aligned in slots P-length..P-1;
slots before that are masked out by a per-row attention mask, and positions are
per row, so rows of different ages decode together. A joining prompt is prefilled
on its own and its keys/values copied into a free row; if it is longer than P, every
row is shifted right first. Active rows stay packed in rows 0..b-1 (a leaving row is
replaced by the last one), so a step computes only the b live rows. When P would
run past the cache, or most slots are dead, all rows shift left together (compaction).
A prompt that starts like the previous one (the same system turn, or the next turn of a
conversation) copies that shared prefix's keys/values instead of recomputing them.
"""
from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.generate import Completion, sample_next

log = logging.getLogger("llmkit.serve")
MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy
INITIAL_SLOTS = 256      # cache length allocated first; it doubles on demand up to the context
MIN_SHARED_PREFIX = 4    # shorter shared prefixes are recomputed: copying them saves nothing


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


@dataclass
class Event:
    """One generated token of sequence `index` (token=True), and/or the end of that sequence."""
    index: int
    text: str = ""
    token: bool = False
    finish: str | None = None   # stop | length | timeout | error | cancelled
    error: str | None = None


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
        # text, stop strings and stop tokens, as llmkit.generate handles them
        self.completion = Completion(tokenizer, prompt, params.stop, () if params.ignore_eos else stop_ids)
        # a seeded request draws from its own generator, so other requests cannot change its tokens
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed((params.seed + index) % 2 ** 64)
        self.generated = 0
        self.length = 0     # tokens of this sequence in the KV cache
        self.pending = -1   # last sampled token, fed to the next decode step
        self.row = -1


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 128,
                 context: int | None = None, timeout: float | None = 600.0, prefill_budget: int = 2048):
        if max_batch < 1 or max_queue < 1:
            raise LlmkitError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be at least 1")
        self.model = model.eval()
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
        self._cache = None  # allocated on first use, grown on demand up to `context` slots
        self._last_prefill = None  # (prompt ids, its 1-row cache): the prefix others may share
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
            if not prompt or len(prompt) + params.max_tokens > self.context or params.max_tokens < 1:
                raise LlmkitError(f"a prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} does not fit "
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
                self._cache = self._last_prefill = None

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
        budget = self.prefill_budget
        while len(self._rows) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    return
                first = self._waiting[0]
                if self._rows and len(first.prompt) > budget and budget < self.prefill_budget:
                    return  # this step's prefill budget is spent; decode first
                group = [self._waiting.popleft()]
                # the n choices of one prompt share a single prefill
                while (self._waiting and len(self._rows) + len(group) < self.max_batch
                       and self._waiting[0].job is first.job and self._waiting[0].prompt is first.prompt):
                    group.append(self._waiting.popleft())
            budget -= len(first.prompt)
            self._admitting = group  # neither queued nor in the batch: a failure must still reach them
            self._prefill(group)
            self._admitting = []

    def _prefill(self, group: list[Sequence]) -> None:
        prompt = group[0].prompt
        n = len(prompt)
        own = self.model.new_cache(1, n)
        start = self._reuse_prefix(prompt, own)
        logits, _ = self.model(torch.tensor([prompt[start:]]), cache=own, last_only=True)
        self._last_prefill = (prompt, own)
        self._fit(joining=n)
        cache, pos = self._cache, self._cache.pos
        for seq in group:
            seq.row = len(self._rows)
            self._rows.append(seq)
            for dst, src in zip(cache.k + cache.v, own.k + own.v):
                dst[seq.row, :, pos - n:pos] = src[0, :, :n]
            seq.length = n
        tokens = self._sample(logits[:, -1].expand(len(group), -1), group)
        for seq, token in zip(group, tokens):
            self._accept(seq, token)

    def _reuse_prefix(self, prompt: list[int], own) -> int:
        """Copy the keys/values of the prefix this prompt shares with the previous one into `own`
        (chat prompts start with the same system turn; a conversation's next prompt extends its last)
        and return its length: that much prefill is skipped. At least one token is always computed."""
        if self._last_prefill is None:
            return 0
        last, cache = self._last_prefill
        limit = min(len(last), len(prompt) - 1)
        shared = next((i for i in range(limit) if last[i] != prompt[i]), limit)
        if shared < MIN_SHARED_PREFIX:
            return 0
        for dst, src in zip(own.k + own.v, cache.k + cache.v):
            dst[:, :, :shared] = src[:, :, :shared]
        own.pos = shared
        return shared

    def _decode(self) -> None:
        self._fit()
        rows, cache = self._rows, self._cache
        pos = cache.pos
        lengths = torch.tensor([s.length for s in rows])
        idx = torch.tensor([[s.pending] for s in rows])
        positions = lengths[:, None]
        mask = torch.arange(pos + 1)[None, :] >= (pos - lengths)[:, None]  # own slots, plus slot `pos` (new)
        view = copy.copy(cache)  # the live rows only: same storage, so writes land in the full cache
        view.k, view.v = [t[:len(rows)] for t in cache.k], [t[:len(rows)] for t in cache.v]
        view.batch_size = len(rows)
        logits, _ = self.model(idx, cache=view, positions=positions, attn_mask=mask, last_only=True)
        cache.pos = view.pos
        self.steps += 1
        batch = list(rows)
        for seq in batch:
            seq.length += 1
        tokens = self._sample(logits[:, -1], batch)
        for seq, token in zip(batch, tokens):
            self._accept(seq, token)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """generate.sample_next over rows that share settings and a generator, in one call per group."""
        groups: dict = {}
        for i, seq in enumerate(seqs):
            key = i if seq.generator is not None else (seq.params.temperature, seq.params.top_p)
            groups.setdefault(key, []).append(i)
        tokens = [0] * len(seqs)
        for rows in groups.values():
            p, gen = seqs[rows[0]].params, seqs[rows[0]].generator or self._generator
            # top_p = 0 keeps only the most likely token (sample_next wants top_p > 0), and a temperature
            # too small for logits / temperature to stay finite is the greedy limit too
            temperature = 0.0 if p.top_p <= 0 or p.temperature < MIN_TEMPERATURE else p.temperature
            picked = sample_next(logits[rows].float(), temperature, None, p.top_p, gen)
            for i, token in zip(rows, picked.tolist()):
                tokens[i] = token
        return tokens

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.generated += 1
        text = seq.completion.push(token, last=seq.generated >= seq.params.max_tokens)
        finish = seq.completion.finish_reason
        seq.job.emit(Event(seq.index, text, token=True, finish=finish))
        if finish:
            self._free(seq)
        else:
            seq.pending = token

    def _free(self, seq: Sequence) -> None:
        """Leave the batch; the last row moves into the hole so live rows stay packed."""
        last = self._rows.pop()
        if last is not seq:
            pos = self._cache.pos
            for t in self._cache.k + self._cache.v:
                t[seq.row, :, pos - last.length:pos] = t[last.row, :, pos - last.length:pos]
            last.row = seq.row
            self._rows[seq.row] = last
        seq.row = -1
        if not self._rows:  # idle: start over at slot 0, and give back a cache a long request grew
            self._cache.pos = 0
            if self._cache.max_len > INITIAL_SLOTS:
                self._cache = None

    # ---- cache geometry ----------------------------------------------------------------

    def _fit(self, joining: int = 0) -> None:
        """Make P >= `joining` (a prompt about to be copied in, ending at slot P) and leave one free
        slot after P: shift right for a long newcomer, compact when out of slots or mostly dead slots."""
        if self._cache is None:
            self._grow(joining + 1)
        cache = self._cache
        live = max([s.length for s in self._rows] + [joining])
        dead = cache.pos - live
        if dead < 0:
            self._grow(live + 1)
            self._shift(-dead)
        elif cache.pos + 1 > cache.max_len or (dead > live and dead >= 64):
            self._shift(-dead)
        if cache.pos + 1 > cache.max_len:
            self._grow(cache.pos + 1)

    def _shift(self, d: int) -> None:
        """Move every live row d slots right (d > 0) or left (d < 0); P moves with them."""
        cache, b, pos = self._cache, len(self._rows), self._cache.pos
        if d == 0:
            return
        start = max(0, -d)  # slots before `start` would fall off the left edge: all dead by construction
        for t in cache.k + cache.v:
            t[:b, :, start + d:pos + d] = t[:b, :, start:pos].clone()
        cache.pos = pos + d

    def _grow(self, need: int) -> None:
        old = self._cache
        size = min(self.context, max(need, INITIAL_SLOTS, 2 * old.max_len if old is not None else 0))
        if old is not None and size <= old.max_len:
            return
        new = self.model.new_cache(self.max_batch, size)
        for t in new.k + new.v:
            t.zero_()  # masked slots must hold finite numbers: 0 * NaN would still poison attention
        if old is not None:
            for dst, src in zip(new.k + new.v, old.k + old.v):
                dst[:, :, :old.pos] = src[:, :, :old.pos]
            new.pos = old.pos
        self._cache = new
