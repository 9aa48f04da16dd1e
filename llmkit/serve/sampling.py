"""Per-row logits processing the engine applies before sampling: the repetition, presence and
frequency penalties, min-p and a JSON grammar, each row with its own request's settings, history
and grammar state.

Order as vLLM's: penalties on the raw logits, then (in infer.sampling.sample_next) temperature,
top-k and top-p; min-p here compares probabilities after temperature, so it is applied as the
equivalent logit threshold max + T * log(min_p).
"""
from __future__ import annotations

import math

import torch

from llmkit.infer.sampling import apply_repetition_penalty
from llmkit.infer.structured import Constraint


def needs_processing(params) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0 or params.min_p > 0.0 or params.grammar is not None)


def penalize(row: torch.Tensor, params, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One (V,) row of float logits: CTRL's repetition penalty over prompt and output (as HF),
    OpenAI's presence and frequency penalties over the output only."""
    if params.repetition_penalty != 1.0:
        row = apply_repetition_penalty(row[None], [prompt + output], params.repetition_penalty)[0]
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=row.shape[-1]).to(row.dtype)
        row = row - counts * params.frequency_penalty - (counts > 0).to(row.dtype) * params.presence_penalty
    return row


def min_p_filter(row: torch.Tensor, min_p: float, temperature: float) -> torch.Tensor:
    """Drop tokens whose probability (at this temperature) is below min_p times the top token's."""
    if min_p <= 0.0 or temperature <= 0.0:
        return row
    return row.masked_fill(row < row.max() + temperature * math.log(min_p), float("-inf"))


def process(logits: torch.Tensor, seqs, temperature_of, tokenizer) -> torch.Tensor:
    """(B, V) float logits -> processed logits; rows whose request asks for nothing are untouched.
    A row with a grammar gets its own grammar state on first use (structured.py), then its mask."""
    if not any(needs_processing(s.params) for s in seqs):
        return logits
    out = logits.clone()
    for i, seq in enumerate(seqs):
        p = seq.params
        if needs_processing(p):
            row = penalize(out[i], p, seq.prompt, seq.output)
            if p.grammar is not None:  # before min-p, which must pick among the tokens the grammar allows
                if seq.constraint is None:
                    seq.constraint = Constraint(tokenizer, row.shape[-1], p.grammar)
                row = seq.constraint.apply(row.clone())
            out[i] = min_p_filter(row, p.min_p, temperature_of(p))
    return out
