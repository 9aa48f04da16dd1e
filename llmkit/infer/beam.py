"""Beam search for every generating model: decoder-only (a prompt) and encoder-decoder (a source).

The search keeps `num_beams` running hypotheses as the rows of one batch, so each step is a single
forward pass; the KV cache follows the surviving beams through `cache.reorder(parents)` instead of
being recomputed. The bookkeeping follows the rules of Hugging Face `generate(num_beams=...)`, so the
two agree token for token on the same weights:

- every step takes the best `max(2, 1 + n_eos) * num_beams` continuations over all beams (summed
  log-probabilities), so at least `num_beams` of them do not end;
- a continuation that ends (an end token, or the length limit) and ranks among the first `num_beams`
  becomes a finished hypothesis scored sum_logprob / generated_len ** length_penalty;
- the best `num_beams` that do not end run on;
- early_stopping=True stops once `num_beams` hypotheses are finished; False stops once the best
  running beam, normalised by its current length, cannot beat the worst finished one; "never" uses
  the longest possible length for that bound when length_penalty > 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError

NEG = -1.0e9  # "impossible" score; finite so arithmetic on it stays finite


@dataclass
class BeamParams:
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 1.0          # > 0 favours longer hypotheses, < 0 shorter
    early_stopping: bool | str = False   # True, False or "never" (see the module docstring)
    no_repeat_ngram_size: int = 0        # 0: off; n: no n-gram occurs twice in prompt + output
    num_return_sequences: int = 1

    def __post_init__(self):
        if isinstance(self.early_stopping, str) and self.early_stopping.lower() in ("true", "false"):
            self.early_stopping = self.early_stopping.lower() == "true"
        checks = [
            (isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be an integer >= 1, got {self.num_beams!r}"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1 for beam search, got {self.max_new_tokens!r}"),
            (self.early_stopping in (True, False, "never"),
             f"early_stopping must be true, false or never, got {self.early_stopping!r}"),
            (isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
             f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}"),
            (isinstance(self.num_return_sequences, int) and 1 <= self.num_return_sequences <= self.num_beams,
             f"num_return_sequences must be between 1 and num_beams={self.num_beams}, got {self.num_return_sequences!r}"),
            (isinstance(self.length_penalty, (int, float)) and abs(self.length_penalty) < 1e6,
             f"length_penalty must be a finite number, got {self.length_penalty!r}"),
        ]
        failed = [message for ok, message in checks if not ok]
        if failed:
            raise LlmkitError(failed[0])


def ban_repeated_ngrams(history: torch.Tensor, logprobs: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would complete an n-gram already present in its row of
    `history` (B, L): the rows' last n-1 tokens are compared with the start of every n-gram."""
    if n <= 0 or history.shape[1] < n:
        return logprobs
    grams = history.unfold(1, n, 1)                              # (B, L-n+1, n)
    tail = history[:, history.shape[1] - n + 1:]                 # (B, n-1)
    hit = (grams[..., :-1] == tail[:, None]).all(-1)             # (B, L-n+1)
    vocab = logprobs.shape[-1]
    # a miss points at a spare column past the vocabulary, dropped below
    target = torch.where(hit, grams[..., -1].clamp(max=vocab), vocab)
    banned = torch.zeros(logprobs.shape[0], vocab + 1, dtype=torch.bool, device=logprobs.device)
    banned.scatter_(1, target, True)
    return logprobs.masked_fill(banned[:, :vocab], float("-inf"))


@dataclass
class Hypothesis:
    tokens: list[int]      # generated ids, the end token included when one ended it
    score: float           # sum of log-probabilities / len(tokens) ** length_penalty


def beam_search(first_logits: torch.Tensor, step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                prompt: list[int], end_ids: list[int], params: BeamParams,
                repetition_penalty: float = 1.0) -> list[Hypothesis]:
    """Run the search for one input and return its `num_return_sequences` best hypotheses, best first.

    first_logits: (V,) next-token logits after the prompt (or the decoder start token).
    step(parents, tokens): rows of the cache become rows `parents` (num_beams,) of the previous
    step's rows, each extended by its token; returns the next logits (num_beams, V). The first call
    has a single previous row (the prompt's), which `parents` then duplicates.
    prompt: the ids before the generated ones (what no_repeat_ngram_size also looks at).
    repetition_penalty: CTRL's penalty over each beam's prompt + output, on the log-probabilities (as HF)."""
    from llmkit.infer.sampling import apply_repetition_penalty

    nb, N, lp = params.num_beams, params.max_new_tokens, float(params.length_penalty)
    device = first_logits.device
    keep = max(2, 1 + len(end_ids)) * nb
    ends = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)
    top_ranks = torch.arange(keep, device=device) < nb
    prefix = torch.tensor(prompt, dtype=torch.long, device=device)
    seqs = torch.empty(nb, 0, dtype=torch.long, device=device)          # running hypotheses
    scores = torch.full((nb,), NEG, device=device)
    scores[0] = 0.0                                                     # one real beam at the start
    done = _Finished.empty(nb, N, device)                               # finished hypotheses
    still_open = True                                                   # may a running beam still win?
    logits = first_logits.float().expand(nb, -1)
    for length in range(1, N + 1):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if params.no_repeat_ngram_size or repetition_penalty != 1.0:
            history = torch.cat((prefix.expand(nb, -1), seqs), dim=1)
            logprobs = apply_repetition_penalty(logprobs, history, repetition_penalty)
            logprobs = ban_repeated_ngrams(history, logprobs, params.no_repeat_ngram_size)
        vocab = logprobs.shape[-1]
        total = (logprobs + scores[:, None]).reshape(-1)
        cand_scores, flat = total.topk(min(keep, total.numel()))
        parent, token = flat // vocab, flat % vocab
        cand = torch.cat((seqs[parent], token[:, None]), dim=1)
        ending = torch.isin(token, ends) | (length == N)
        # the best continuations that do not end run on
        running = cand_scores + ending.float() * NEG
        order = running.topk(nb).indices
        seqs, scores, parents = cand[order], running[order], parent[order]
        # the top-ranked ones that end compete for the finished slots
        eligible = ending & top_ranks[:len(ending)]
        blocked = (bool(done.real.all()) and params.early_stopping is True) or not still_open
        done.offer(cand, cand_scores / (length ** lp) + (NEG if blocked else 0.0) + NEG * (~eligible).float(),
                   length, eligible)
        still_open = still_open and _can_improve(scores, done.scores, done.real, length, N, params)
        if not still_open or (bool(done.real.all()) and params.early_stopping is True) or bool(ending.all()):
            break
        # the first step's beams all descend from the prompt's single row
        logits = step(parents if length > 1 else torch.zeros_like(parents), seqs[:, -1])
    return [Hypothesis(done.seqs[i, :int(done.lens[i])].tolist(), float(done.scores[i]))
            for i in range(params.num_return_sequences)]


@dataclass
class _Finished:
    """The num_beams best finished hypotheses so far: token rows padded to N, lengths, length-penalised
    scores, and whether each slot holds a real hypothesis (not a NEG-scored filler)."""
    seqs: torch.Tensor
    lens: torch.Tensor
    scores: torch.Tensor
    real: torch.Tensor

    @classmethod
    def empty(cls, nb: int, N: int, device) -> "_Finished":
        return cls(torch.zeros(nb, N, dtype=torch.long, device=device), torch.zeros(nb, dtype=torch.long, device=device),
                   torch.full((nb,), NEG, device=device), torch.zeros(nb, dtype=torch.bool, device=device))

    def offer(self, cand: torch.Tensor, final: torch.Tensor, length: int, eligible: torch.Tensor) -> None:
        """Candidates `cand` (length `length`, scores `final`; NEG where they may not finish) compete
        with the kept ones for the slots."""
        merged = torch.cat((self.scores, final))
        padded = torch.zeros(len(cand), self.seqs.shape[1], dtype=torch.long, device=cand.device)
        padded[:, :length] = cand
        pick = merged.topk(len(self.scores)).indices
        self.seqs = torch.cat((self.seqs, padded))[pick]
        self.lens = torch.cat((self.lens, torch.full((len(cand),), length, device=cand.device)))[pick]
        self.real = torch.cat((self.real, eligible))[pick]
        self.scores = merged[pick]


def _can_improve(scores, done_scores, done_real, length: int, N: int, params: BeamParams) -> bool:
    """Whether the best running beam could still beat the worst finished hypothesis."""
    lp = float(params.length_penalty)
    best_length = N if params.early_stopping == "never" and lp > 0 else length
    best = float(scores[0]) / best_length ** lp
    worst = float(done_scores.min()) if bool(done_real.all()) else NEG
    return best > worst


# ---- drivers ---------------------------------------------------------------------------------


def decoder_step(model, cache):
    """The `step` of a decoder-only model: reorder its KV cache by the parents, feed one token per beam."""

    def step(parents, tokens):
        # the cache copies every layer on a reorder: skip it when each beam continues its own row
        if len(parents) != cache.batch_size or not torch.equal(parents.cpu(), torch.arange(len(parents))):
            cache.reorder(parents)
        return model(tokens[:, None], cache=cache, last_only=True)[0][:, -1]

    return step


def beam_decode(model, prompt_ids: list[int], end_ids: list[int], params: BeamParams,
                repetition_penalty: float = 1.0) -> list[Hypothesis]:
    """Beam search over a decoder-only model from one tokenized prompt."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device
            cache = model.new_cache(1, len(prompt_ids) + params.max_new_tokens)
            ids = torch.tensor([prompt_ids], device=device)
            first = model(ids, cache=cache, last_only=True)[0][0, -1]
            return beam_search(first, decoder_step(model, cache), prompt_ids, end_ids, params, repetition_penalty)
    finally:
        model.train(was_training)


def generate_beams(model, tokenizer, prompts: list[str], sampling, params: BeamParams) -> list[list[str]]:
    """For each prompt, the texts of its `num_return_sequences` best hypotheses (end tokens dropped,
    cut at the first stop string). Sampling settings other than max_new_tokens, stop and
    repetition_penalty do not apply: beam search is deterministic."""
    from llmkit.infer.generate import _encode_prompts

    if getattr(model, "arch", None) == "seq2seq":
        end_ids = [model.config.eos_id]
        searches = (seq2seq_decode(model, ids, params, sampling.repetition_penalty)
                    for ids in encode_sources(model, tokenizer, prompts))
    else:
        end_ids = tokenizer.stop_ids
        searches = (beam_decode(model, ids, end_ids, params, sampling.repetition_penalty)
                    for ids in _encode_prompts(model, tokenizer, prompts, params.max_new_tokens))
    return [[_text(tokenizer, h.tokens, end_ids, sampling.stop) for h in hyps] for hyps in searches]


def encode_sources(model, tokenizer, sources: list[str]) -> list[list[int]]:
    """Source ids for an encoder-decoder model: the text's tokens, then the end token. A source longer
    than the encoder's context is refused, naming it (training refuses it the same way)."""
    cfg, rows = model.config, []
    for i, text in enumerate(sources):
        ids = tokenizer.encode(text) + [cfg.eos_id]
        if cfg.pos != "relative" and len(ids) > cfg.block_size:
            raise LlmkitError(f"source {i} has {len(ids)} tokens (with the end token), more than the encoder's "
                              f"context of {cfg.block_size}; shorten it")
        rows.append(ids)
    return rows


def _text(tokenizer, tokens: list[int], end_ids, stop: tuple[str, ...]) -> str:
    return finish_text(tokenizer, tokens, end_ids, stop)[0]


def finish_text(tokenizer, tokens: list[int], end_ids, stop: tuple[str, ...]) -> tuple[str, str]:
    """(text, finish reason) of a hypothesis: the end token dropped, cut at the first stop string;
    "stop" when either ended it, else "length"."""
    ended = bool(tokens) and tokens[-1] in end_ids
    text = tokenizer.decode(tokens[:-1] if ended else tokens)
    cuts = [i for s in stop if (i := text.find(s)) != -1]
    return (text[:min(cuts)], "stop") if cuts else (text, "stop" if ended else "length")


def seq2seq_decode(model, src_ids: list[int], params: BeamParams, repetition_penalty: float = 1.0) -> list[Hypothesis]:
    """Beam search over an encoder-decoder model for one tokenized source: the encoder runs once,
    cross-attention keys/values are computed once and copied to the beams."""
    cfg = model.config
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = next(model.parameters()).device
            src = torch.tensor([src_ids], device=device)
            mask = torch.ones_like(src, dtype=torch.bool)
            cache = model.new_cache(model.encode(src, mask), mask, params.max_new_tokens + 1)
            first = model.decode(torch.tensor([[cfg.decoder_start_id]], device=device), cache, last_only=True)[0, -1]

            def step(parents, tokens):
                cache.reorder(parents)
                return model.decode(tokens[:, None], cache, last_only=True)[:, -1]

            return beam_search(first, step, [cfg.decoder_start_id], [cfg.eos_id], params, repetition_penalty)
    finally:
        model.train(was_training)
