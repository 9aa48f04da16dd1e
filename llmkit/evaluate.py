"""Language-model evaluation: perplexity over a token stream and batched log-likelihoods.

`perplexity` slides windows of the model's context over a long token sequence
and scores every token exactly once; with a stride shorter than the window each
token after the first window is predicted from at least block_size - stride
tokens of context, which lowers (improves) the number at the cost of more
compute. `loglikelihood` scores continuations given contexts, the building block
for multiple-choice benchmarks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError

IGNORE = -100


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_tokens(tokens_or_text, tokenizer) -> np.ndarray:
    if isinstance(tokens_or_text, str):
        if tokenizer is None:
            raise LlmkitError("perplexity of raw text needs a tokenizer")
        return np.asarray(tokenizer.encode(tokens_or_text), dtype=np.int64)
    if isinstance(tokens_or_text, torch.Tensor):
        return tokens_or_text.detach().cpu().reshape(-1).numpy()
    return np.asarray(tokens_or_text).reshape(-1)  # lists, arrays and memmaps (read lazily below)


def windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window over a sequence of `n_tokens`.

    The window feeds tokens[begin:end] and predicts tokens[begin+1:end+1]; targets
    at positions < first_scored were already scored by an earlier window.
    """
    out, scored_until = [], 1  # position 0 has no context, so it is never a target
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + block_size, n_tokens - 1)
        out.append((begin, end, scored_until))
        scored_until = end + 1
        begin += stride
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens_or_text, tokenizer=None, block_size: int | None = None,
               batch_size: int = 8, stride: int | None = None) -> dict:
    """Mean next-token NLL (nats) and perplexity of a token sequence or text.

    Returns {"loss", "perplexity", "tokens"} where tokens is the number of scored targets.
    """
    tokens = _as_tokens(tokens_or_text, tokenizer)
    block_size = block_size or model.config.block_size
    stride = stride or block_size
    if block_size > model.config.block_size:
        raise LlmkitError(f"block_size {block_size} exceeds the model's context of {model.config.block_size}")
    if not 0 < stride <= block_size:
        raise LlmkitError(f"stride must be in 1..block_size ({block_size}), got {stride}")
    if len(tokens) < 2:
        raise LlmkitError(f"need at least 2 tokens to measure perplexity, got {len(tokens)}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    spans = windows(len(tokens), block_size, stride)
    try:
        for i in range(0, len(spans), batch_size):
            chunk = spans[i:i + batch_size]
            x = torch.zeros(len(chunk), block_size, dtype=torch.long)
            y = torch.full((len(chunk), block_size), IGNORE, dtype=torch.long)
            for row, (begin, end, first) in enumerate(chunk):
                window = torch.from_numpy(np.asarray(tokens[begin:end + 1], dtype=np.int64))
                n = end - begin
                x[row, :n] = window[:-1]
                # Padding after `end` cannot leak into earlier positions: attention is causal.
                y[row, first - begin - 1:n] = window[first - begin:]
            x, y = x.to(device), y.to(device)
            logits, _ = model(x)
            nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                  ignore_index=IGNORE, reduction="sum")
            total += nll.item()
            count += int((y != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


@torch.no_grad()
def loglikelihood(model: torch.nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                  batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each (context_ids, continuation_ids): (sum of log p(continuation | context), is_greedy).

    is_greedy is True when every continuation token is the argmax prediction. Sequences
    longer than the model's context keep their rightmost tokens; rows are right-padded.
    """
    block_size = model.config.block_size
    device = _model_device(model)
    rows = []
    for context, continuation in requests:
        if len(continuation) == 0:
            raise LlmkitError("loglikelihood needs a non-empty continuation")
        seq = (list(context) + list(continuation))[-(block_size + 1):]
        if len(seq) < 2:
            raise LlmkitError("loglikelihood needs at least one context token")
        rows.append((seq, min(len(continuation), len(seq) - 1)))
    was_training = model.training
    model.eval()
    results: list[tuple[float, bool]] = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            width = max(len(seq) - 1 for seq, _ in chunk)
            x = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (seq, _) in enumerate(chunk):
                x[row, :len(seq) - 1] = torch.tensor(seq[:-1])
            logits, _ = model(x.to(device))
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            for row, (seq, n_cont) in enumerate(chunk):
                n_in = len(seq) - 1
                targets = torch.tensor(seq[-n_cont:])
                scores = logprobs[row, n_in - n_cont:n_in]
                picked = scores.gather(-1, targets[:, None]).squeeze(-1)
                results.append((picked.sum().item(), bool((scores.argmax(-1) == targets).all())))
    finally:
        model.train(was_training)
    return results


def evaluate_model(model_dir, text_file=None, data_dir=None, split: str = "val", batch_size: int = 8,
                   stride: int | None = None, max_tokens: int | None = None, device: str = "auto") -> dict:
    """Perplexity of a saved model on a text file or a prepared data split (what `llmkit eval` runs)."""
    from pathlib import Path

    from llmkit.checkpoint import load_checkpoint

    if (text_file is None) == (data_dir is None):
        raise LlmkitError("give exactly one of --text FILE or --data DIR")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_checkpoint(model_dir, device=device)
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmkitError(f"cannot read text file {text_file}: {e}") from None
        tokens = _as_tokens(text, tokenizer)
        source = str(text_file)
    else:
        from llmkit.data import load_split

        if not Path(data_dir).is_dir():
            raise LlmkitError(f"data dir {data_dir} does not exist")
        tokens = load_split(data_dir, split)
        if int(tokens.max(initial=0)) >= model.config.vocab_size:
            raise LlmkitError(f"{data_dir}/{split} holds token ids beyond the model's vocab of "
                              f"{model.config.vocab_size} (prepared with another tokenizer?)")
        source = f"{data_dir} ({split})"
    if max_tokens:
        tokens = tokens[:max_tokens]
    result = perplexity(model, tokens, batch_size=batch_size, stride=stride)
    return {"source": source, **result}
