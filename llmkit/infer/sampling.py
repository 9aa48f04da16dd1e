"""Logits processing and sampling as small pure functions: (B, V) logits in, token ids out.

They know nothing about batching or caches: the decode loop (generate.py), beam search (beam.py)
and the server's per-row processing (serve/sampling.py) all call them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError

# ---- logits processing: (B, V) logits in, (B, V) logits out ---------------------------------


def apply_repetition_penalty(logits: torch.Tensor, history_ids, penalty: float) -> torch.Tensor:
    """CTRL's rule (as in HF): for every token already in the row's history, divide its logit by
    `penalty` if positive, multiply if negative. history_ids: (B, L) tensor or list of id lists;
    negative ids are padding and ignored."""
    if penalty == 1.0 or history_ids is None:
        return logits
    if not isinstance(history_ids, torch.Tensor):
        width = max((len(h) for h in history_ids), default=0)
        history_ids = torch.tensor([list(h) + [-1] * (width - len(h)) for h in history_ids], dtype=torch.long)
    history = history_ids.to(logits.device).reshape(logits.shape[:-1] + (-1,))
    seen = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    seen.scatter_add_(-1, history.clamp(min=0), (history >= 0).float())
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen > 0, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included), set the rest to -inf."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability mass reaches p
    (the top token is always kept), set the rest to -inf."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token id per row of (B, V) logits: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted by top-k, then top-p (HF's order)."""
    # One reduction catches NaN (propagates through max), +inf and all -inf rows: softmax turns each
    # into NaN, which multinomial rejects with a traceback and argmax turns into an arbitrary token.
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        raise LlmkitError("the model produced NaN or infinite logits; its weights may be corrupt "
                          "(or try float32 instead of float16)")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()      # strings that end a completion (not included in it)
    seed: int | None = None         # None: the global torch RNG
    ignore_eos: bool = False        # go on past the tokenizer's stop tokens (benchmarks)
    json_schema: dict | None = None  # constrain the output to JSON following it (structured.py)
    # the server's per-row processing (serve/sampling.py) reads these; generate() does not
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None     # report each token's log-probability and this many alternatives
    grammar: str | None = None      # an llguidance grammar (structured.py) the output must follow

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
             f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}"),
            (math.isfinite(self.temperature) and self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop strings must be non-empty, got {self.stop!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlmkitError(message)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           history=None) -> torch.Tensor:
    """Next ids for (B, V) logits under `params`; history: ids so far, for the repetition penalty."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    return sample_next(logits, params.temperature, params.top_k, params.top_p, generator)
