"""Log-probabilities of tokens and of their most likely alternatives, and OpenAI's two shapes for them.

The numbers are the model's own distribution, log_softmax of the raw logits, before temperature,
penalties or filters (as vLLM reports them), so they score text the same whatever the sampling.
Chat completions list one entry per token ({token, logprob, bytes, top_logprobs});
legacy completions four parallel lists (tokens, token_logprobs, top_logprobs, text_offset).
"""
from __future__ import annotations

import functools

import torch


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(token, its log-probability, the `top` most likely (id, log-probability)) for one (V,) logits row."""
    logp = logits.float().log_softmax(-1)
    alternatives = []
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return token, float(logp[token]), alternatives


@torch.inference_mode()
def score_prompt(model, ids: list[int], top: int) -> list[tuple[int, float | None, list]]:
    """Each prompt token with its log-probability given the tokens before it (None for the first,
    which nothing predicts), as OpenAI's echo=True with logprobs."""
    logits, _ = model(torch.tensor([ids]))
    scored = [(ids[0], None, [])]
    for i in range(1, len(ids)):
        scored.append(token_logprobs(logits[0, i - 1], ids[i], top))
    return scored


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


@functools.lru_cache(maxsize=1)
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: byte-level BPE vocabularies spell each byte as one
    printable character (printable Latin-1 bytes as themselves, the others from U+0100 up)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(0x100 + i): b for i, b in enumerate(moved)}}


def token_bytes(tokenizer, token: int) -> list[int]:
    """A token's own bytes: part of a UTF-8 character for byte-level BPE, which is why OpenAI's
    logprobs carry them (the bytes of all tokens join into the text; their strings may not)."""
    from tokenizers.decoders import ByteLevel

    piece = tokenizer.id_to_token(token)
    table = _byte_of_char()
    if isinstance(tokenizer.hf.decoder, ByteLevel) and piece and all(c in table for c in piece):
        return [table[c] for c in piece]
    return list(token_text(tokenizer, token).encode("utf-8"))


def chat_entries(tokenizer, scored) -> list[dict]:
    """Chat completions' logprobs.content: one dict per token."""
    def entry(token, logprob):
        return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": token_bytes(tokenizer, token)}

    return [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
            for token, logprob, top in scored]


def completion_logprobs(tokenizer, scored, offset: int = 0) -> dict:
    """Legacy completions' logprobs: parallel lists; text_offset counts characters from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, logprob, top in scored:
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append({token_text(tokenizer, t): lp for t, lp in top} if logprob is not None else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
