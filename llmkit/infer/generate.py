"""Text generation: the one decode path, over the sampling functions of sampling.py.

The two text helpers at the top (IncrementalDecoder, Completion) know nothing about batching or
caches. `Decoder` is the decode path every caller takes (generate, stream, chat, the server's
continuous batching): one KV cache whose rows each keep their own length, so prompts of any
lengths batch without padding on the left, `prefill` runs them, `step` advances every row by one
token; `compile=True` runs the steps through a torch.compile'd block over a static cache.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams, sample
from llmkit.model.decoder import Block

PREFILL_CHUNK = 256  # prompt tokens per forward call in Decoder.prefill

# ---- text helpers ---------------------------------------------------------------------------


class IncrementalDecoder:
    """Token ids in, new text out, never splitting a multi-byte character.

    Each step decodes a short window (the previously emitted tokens plus the new ones) and returns
    what it adds; while the new text ends in U+FFFD (an incomplete UTF-8 sequence) it waits for
    more bytes. Seed it with the last prompt tokens so tokenizers that strip a leading space from
    the first token of a decode (SentencePiece) still see the context."""

    def __init__(self, tokenizer, context_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(context_ids)
        self.prefix = 0               # window start: context already turned into text
        self.read = len(self.ids)     # tokens before this were emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back (a truncated character becomes U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        seen = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]


class Completion:
    """One row's completion: token ids, text, stop handling and the pieces safe to stream.

    Text that could be the start of a stop string is held back until it is known not to be one,
    so the streamed pieces always concatenate to the final (stop-truncated) text."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: Iterable[str] = (), stop_ids: Iterable[int] = ()):
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids[-8:])
        self.stop = tuple(stop)
        self.stop_ids = set(stop_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0                 # characters of text already handed out
        self.finish_reason: str | None = None  # "stop" or "length" once done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int, last: bool = False) -> str:
        """Add a sampled token (`last`: the length limit is reached); return the new streamable text."""
        token_id = int(token_id)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self._add(self.decoder.flush())
        self.token_ids.append(token_id)
        piece = self.decoder.push(token_id)
        if last:
            self.finish_reason = "length"
            piece += self.decoder.flush()
        return self._add(piece)

    def _add(self, piece: str) -> str:
        old = len(self.text)
        self.text += piece
        hits = [i for s in self.stop if (i := self.text.find(s, max(0, old - len(s) + 1))) != -1]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason = "stop"
        end = len(self.text) if self.done else len(self.text) - self._held_back()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of text that a stop string starts with."""
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), held, -1):
                if self.text.endswith(s[:k]):
                    held = k
                    break
        return held


# ---- the decode path -------------------------------------------------------------------------


def _block_step(block, x, rope, cache, mask, causal):
    return Block.forward(block, x, rope, cache, mask, causal)


_compiled_block_step = None


class CompiledBlock(Block):
    """A decoder block whose one-token steps over a static cache run one torch.compile'd graph.

    Decoding one token runs ~40 small ops per layer, each a dispatch (and, with threads, an OpenMP
    fork/join); inductor fuses norms, RoPE, SiLU * up and residual adds around the matmuls. The
    weights are graph inputs, so one compiled graph serves every layer and compile time is that of
    one block. Installed (by type, in place) when a Decoder is made with compile=True."""

    def forward(self, x, rope=None, cache=None, mask=None, causal=True):
        global _compiled_block_step
        if cache is None or x.shape[1] != 1 or getattr(cache, "last_slot", None) is None:
            return _block_step(self, x, rope, cache, mask, causal)
        if _compiled_block_step is None:
            _compiled_block_step = torch.compile(_block_step, dynamic=False, fullgraph=True)
        return _compiled_block_step(self, x, rope, cache, mask, causal)


class Decoder:
    """`batch_size` rows of up to `max_len` tokens in one KV cache, and the model steps over them.

        dec = Decoder(model, batch_size=2, max_len=600)
        logits = dec.prefill([[1, 2, 3], [4, 5]])   # prompts of any lengths -> (2, V) after each
        logits = dec.step(torch.tensor([7, 8]))      # one more token per row -> (2, V)

    prefill and step run rows 0..n-1 of the cache (`cache.lengths[r]` tokens each so far). With
    compile=True the cache is static: rows move in lockstep (equal prompt lengths) and every step
    has the same shapes, so after the first step the compiled graph's guards are skipped.
    """

    def __init__(self, model, batch_size: int, max_len: int, compile: bool = False, cache=None):
        if compile and (model.training or model.config.pos == "sinusoidal"):
            raise LlmkitError("compiled decoding needs a model in eval mode with learned or rotary positions")
        self.model, self.compile, self._warm = model, compile, False
        self.cache = cache if cache is not None else model.new_cache(batch_size, max_len, static=compile)
        if compile:
            from llmkit.infer.cpu import CpuBlock, recast, swap_modules

            swap_modules(model, {Block: recast(CompiledBlock), CpuBlock: recast(CompiledBlock)})

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Append each prompt to its row (0..n-1; rows right-padded to the longest); (n, V) logits."""
        device = self.cache.k[0].device if self.cache.k else None
        lengths = [len(p) for p in prompts]
        idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
        for i, ids in enumerate(prompts):
            idx[i, :len(ids)] = torch.tensor(ids)
        ragged = min(lengths) != max(lengths)
        if ragged and self.compile:
            raise LlmkitError("compiled decoding runs prompts of equal length only")
        if ragged:
            return self.model(idx.to(device), cache=self.cache, lengths=lengths, last_only=True)[0][:, -1]
        # Level rows go through in chunks, as llama.cpp's batches do: a 518-token prompt's activations
        # at once took ~30 MB more peak memory (a sixth of a quantized SmolLM2's) and were no faster.
        idx = idx.to(device)
        for start in range(0, idx.shape[1], PREFILL_CHUNK):
            logits = self.model(idx[:, start:start + PREFILL_CHUNK], cache=self.cache, last_only=True)[0][:, -1]
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token (B,) to each of rows 0..B-1; (B, V) logits after it."""
        if not self._warm:  # the first step compiles and checks every guard
            self._warm = True
        elif self.compile:
            # later steps have the same shapes and dtypes; checking the guards (every weight's
            # metadata, for every layer) would cost ~0.25 ms per layer
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.model(tokens[:, None], cache=self.cache, last_only=True)[0][:, -1]
        return self.model(tokens[:, None], cache=self.cache, last_only=True)[0][:, -1]


def _encode_prompts(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    rows = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:  # the model needs one token to predict from: start a fresh document
            if start is None:
                raise LlmkitError(f"prompt {i} is empty and the tokenizer has no BOS/EOS token to start from")
            ids = [start]
        context = model.config.block_size
        if len(ids) >= context and max_new_tokens > 0:
            raise LlmkitError(f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                              f"{len(ids) + max_new_tokens}, more than the model context of {context} tokens")
        rows.append(ids)
    return rows


_CLAMPS_SAID: set = set()


def room_for_answer(model, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """max_new_tokens, lowered to the room the longest prompt leaves in the model's context.

    Small trained models have short contexts (a 64-token block), shorter than the default answer
    length: generate what fits instead of refusing (`say_clamped` tells the user, once)."""
    room = model.config.block_size - max((len(ids) for ids in prompt_ids), default=0)
    return min(max_new_tokens, room)


def say_clamped(model, max_new_tokens: int, room: int) -> None:
    if room < max_new_tokens and (model.config.block_size, max_new_tokens) not in _CLAMPS_SAID:
        _CLAMPS_SAID.add((model.config.block_size, max_new_tokens))
        logging.getLogger("llmkit").warning(
            "note: max_new_tokens=%d does not fit the model's context of %d tokens after the prompt; "
            "generating at most %d", max_new_tokens, model.config.block_size, room)


def _decode_rows(model, tokenizer, prompts: list[str], params: SamplingParams,
                 compile: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (row index, text piece) while the batch decodes; finished rows stop producing text.

    inference_mode is entered around each step, never across a yield, so the caller's code between
    pieces runs with autograd as it expects."""
    prompt_ids = _encode_prompts(model, tokenizer, prompts, params.max_new_tokens)
    stop_ids = () if params.ignore_eos else tokenizer.stop_ids
    rows = [Completion(tokenizer, ids, params.stop, stop_ids) for ids in prompt_ids]
    N = room_for_answer(model, prompt_ids, params.max_new_tokens)
    if N == 0:
        return
    device = next(model.parameters()).device
    B = len(rows)
    lengths = torch.tensor([len(ids) for ids in prompt_ids], device=device)
    history = torch.full((B, int(lengths.max()) + N), -1, dtype=torch.long, device=device)  # -1: none yet
    for i, ids in enumerate(prompt_ids):
        history[i, :len(ids)] = torch.tensor(ids, device=device)
    generator = None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            decoder = Decoder(model, B, history.shape[1], compile=compile)
            logits = decoder.prefill(prompt_ids)
        constraints = _constraints(tokenizer, params.json_schema, B, logits.shape[-1])
        for step in range(N):
            with torch.inference_mode():
                logits = logits.float()
                for i, constraint in enumerate(constraints):
                    if not rows[i].done:
                        constraint.apply(logits[i])
                tokens = sample(logits, params, generator, history)
                for i, constraint in enumerate(constraints):  # JSON closes within the N steps
                    if not rows[i].done:
                        tokens[i] = constraint.fit(int(tokens[i]), N - step)
                history[torch.arange(B, device=device), lengths + step] = tokens
            if step == 0:  # after the first token: a failing model says only what went wrong
                say_clamped(model, params.max_new_tokens, N)
            for i, token in enumerate(tokens.tolist()):
                if not rows[i].done:
                    if constraints:
                        constraints[i].advance(token)
                    piece = rows[i].push(token, last=step == N - 1)
                    if piece:
                        yield i, piece
            if all(row.done for row in rows):
                break
            with torch.inference_mode():
                logits = decoder.step(tokens)
    finally:
        model.train(was_training)


def _constraints(tokenizer, schema: dict | None, rows: int, vocab_size: int) -> list:
    """One grammar state per row when a JSON schema is asked for, else none."""
    if schema is None:
        return []
    from llmkit.infer.structured import Constraint, json_grammar

    grammar = json_grammar(schema)
    return [Constraint(tokenizer, vocab_size, grammar) for _ in range(rows)]


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is not None and not isinstance(params, SamplingParams):
        raise LlmkitError(f"params must be a SamplingParams, got {params!r}; pass e.g. max_new_tokens=... by keyword")
    if params is None:
        return SamplingParams(**overrides)
    return SamplingParams(**{**params.__dict__, **overrides}) if overrides else params


BEAM_OPTIONS = ("num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "num_return_sequences")


def generate(model, tokenizer, prompts: str | list[str], params: SamplingParams | None = None, *,
             compile: bool = False, **overrides) -> str | list[str]:
    """Completions of one prompt (str in, str out) or a batch (list in, list out).
    Keyword overrides are SamplingParams fields, e.g. generate(m, tok, "Hi", max_new_tokens=20), or
    beam search options (llmkit.infer.beam.BeamParams): num_beams=4, length_penalty, early_stopping,
    no_repeat_ngram_size, num_return_sequences (> 1: a list of texts per prompt, best first);
    compile=True decodes through compiled steps (prompts of equal token length)."""
    beam = {k: overrides.pop(k) for k in BEAM_OPTIONS if k in overrides}
    params = _params(params, overrides)
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    if not batch:
        return []
    seq2seq = getattr(model, "arch", None) == "seq2seq"
    if (beam and beam != {"num_beams": 1}) or seq2seq:
        from llmkit.infer.beam import BeamParams, generate_beams

        if seq2seq:  # seq2seq decodes through beam.py; without a beam count that is greedy (one beam)
            beam = {"num_beams": 1, **beam}
        beams = generate_beams(model, tokenizer, batch, params,
                               BeamParams(max_new_tokens=params.max_new_tokens, **beam))
        texts = [hyps[0] if len(hyps) == 1 else hyps for hyps in beams]
        return texts[0] if isinstance(prompts, str) else texts
    pieces: list[list[str]] = [[] for _ in batch]
    for i, piece in _decode_rows(model, tokenizer, batch, params, compile):
        pieces[i].append(piece)
    texts = ["".join(p) for p in pieces]
    return texts[0] if isinstance(prompts, str) else texts


def stream(model, tokenizer, prompt: str, params: SamplingParams | None = None, *, compile: bool = False,
           **overrides) -> Iterator[str]:
    """The completion of one prompt as text pieces, token by token; they join to generate()'s result."""
    for _, piece in _decode_rows(model, tokenizer, [prompt], _params(params, overrides), compile):
        yield piece
