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
from llmkit.utils import progress

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
        for i in progress(range(0, len(spans), batch_size), desc="perplexity", unit="batch"):
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
        for i in progress(range(0, len(rows), batch_size), desc="multiple choice", unit="batch"):
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
    """Perplexity of any model `resolve_model` loads on a text file or a prepared data split
    (what `llmkit eval` runs). Inputs are read and checked before the model is loaded."""
    from pathlib import Path

    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.resolve import resolve_model
    from llmkit.utils import check_device, check_range

    if (text_file is None) == (data_dir is None):
        raise LlmkitError("give exactly one of --text FILE or --data DIR")
    check_range("--batch-size", batch_size, 1, integer=True)
    for name, value in (("--stride", stride), ("--max-tokens", max_tokens)):
        if value is not None:
            check_range(name, value, 1, integer=True)
    device = check_device(device)
    text = None
    if text_file is not None:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmkitError(f"cannot read text file {text_file}: {e}") from None
    elif not Path(data_dir).is_dir():
        raise LlmkitError(f"data dir {data_dir} does not exist")
    model, tokenizer = resolve_model(model_dir, device=device)
    optimize_for_inference(model)
    if text is not None:
        tokens = _as_tokens(text, tokenizer)
        source = str(text_file)
    else:
        from llmkit.data.corpus import load_split

        tokens = load_split(data_dir, split)
        if int(tokens.max(initial=0)) >= model.config.vocab_size:
            raise LlmkitError(f"{data_dir}/{split} holds token ids beyond the model's vocab of "
                              f"{model.config.vocab_size} (prepared with another tokenizer?)")
        source = f"{data_dir} ({split})"
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    result = perplexity(model, tokens, batch_size=batch_size, stride=stride)
    return {"source": source, **result}


# ---- task scoring: multiple choice by log-likelihood, generation against references ---------


def _question_prompt(tokenizer, question: str, chat: bool) -> str:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return f"Question: {question}\nAnswer:"


def read_mc_items(path) -> list[dict]:
    """Multiple-choice JSONL: {"question": str, "choices": [str, ...], "answer": index or choice text}."""
    from llmkit.utils import read_jsonl

    items = []
    for number, r in read_jsonl(path, "multiple-choice file"):
        where = f"{path}:{number}"
        if not isinstance(r, dict) or not isinstance(r.get("question"), str):
            raise LlmkitError(f"{where}: expected {{\"question\": str, \"choices\": [...], \"answer\": ...}}")
        choices = r.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise LlmkitError(f"{where}: 'choices' must be a list of at least two non-empty strings")
        answer = r.get("answer")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise LlmkitError(f"{where}: 'answer' must be a choice index 0..{len(choices) - 1} or one of the choices")
        items.append({"question": r["question"], "choices": choices, "answer": answer})
    return items


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, cut from one encoding of the joined text so the
    boundary tokenizes as the model would read it; an empty context starts from BOS (or EOS)."""
    whole = tokenizer.encode(context + continuation)
    n_ctx = len(tokenizer.encode(context)) if context else 0
    ctx, cont = whole[:n_ctx], whole[n_ctx:]
    if not cont:  # the continuation merged into the context's last token
        ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    if not ctx:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise LlmkitError("an empty context needs a tokenizer with a BOS or EOS token")
        ctx = [start]
    return ctx, cont


def multiple_choice(model, tokenizer, items: list[dict], batch_size: int = 8, chat: bool = False) -> dict:
    """Accuracy of picking the choice with the highest log-likelihood (acc) and the highest
    log-likelihood per character (acc_norm, which does not favour short answers)."""
    requests, owners = [], []
    for i, item in enumerate(items):
        context = _question_prompt(tokenizer, item["question"], chat)
        for choice in item["choices"]:
            requests.append(split_continuation(tokenizer, context, choice if chat else " " + choice))
            owners.append(i)
    scores = loglikelihood(model, requests, batch_size=batch_size)
    per_item: list[list[float]] = [[] for _ in items]
    for i, (logprob, _) in zip(owners, scores):
        per_item[i].append(logprob)
    correct = correct_norm = 0
    predictions = []
    for item, logprobs in zip(items, per_item):
        pick = max(range(len(logprobs)), key=logprobs.__getitem__)
        normed = [lp / len(c) for lp, c in zip(logprobs, item["choices"])]
        pick_norm = max(range(len(normed)), key=normed.__getitem__)
        correct += pick == item["answer"]
        correct_norm += pick_norm == item["answer"]
        predictions.append({"prediction": pick, "answer": item["answer"], "logprobs": logprobs})
    n = len(items)
    return {"task": "multiple_choice", "n": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "predictions": predictions}


def read_gen_items(path) -> list[dict]:
    """Generation JSONL: {"prompt": str, "reference": str or [str, ...]}."""
    from llmkit.utils import read_jsonl

    items = []
    for number, r in read_jsonl(path, "generation file"):
        where = f"{path}:{number}"
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            raise LlmkitError(f"{where}: expected {{\"prompt\": str, \"reference\": str or [str, ...]}}")
        refs = r.get("reference")
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(x, str) for x in refs):
            raise LlmkitError(f"{where}: 'reference' must be a string or a non-empty list of strings")
        items.append({"prompt": r["prompt"], "references": refs})
    return items


def text_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    """Exact match, corpus BLEU and chrF (sacrebleu) and mean ROUGE-1/2/L F1 (rouge-score), all 0..100.
    With several references an item counts its best match."""
    import sacrebleu
    from rouge_score import rouge_scorer

    norm = " ".join
    exact = sum(any(norm(p.split()) == norm(r.split()) for r in refs) for p, refs in zip(predictions, references))
    # sacrebleu wants reference streams of equal length: repeat an item's last reference,
    # which changes neither BLEU's clipped counts nor chrF's best-reference choice.
    width = max(len(refs) for refs in references)
    streams = [[refs[min(j, len(refs) - 1)] for refs in references] for j in range(width)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, refs in zip(predictions, references):
        for key, score in scorer.score_multi(refs, p).items():
            rouge[key] += score.fmeasure
    n = len(predictions)
    return {"exact_match": 100 * exact / n,
            "bleu": sacrebleu.corpus_bleu(predictions, streams).score,
            "chrf": sacrebleu.corpus_chrf(predictions, streams).score,
            **{key: 100 * value / n for key, value in rouge.items()}}


def generation(model, tokenizer, items: list[dict], max_new_tokens: int = 64, batch_size: int = 8,
               chat: bool = False, stop=None, num_beams: int = 1) -> dict:
    """Greedy (or num_beams beam search) completions (llmkit.infer.generate) scored against the
    references by `text_metrics`. `stop` defaults to a newline for plain prompts; chat replies end at
    the end-of-turn token. Encoder-decoder models read each prompt as the source."""
    from llmkit.infer.sampling import SamplingParams
    from llmkit.infer.generate import generate

    stop = tuple(stop) if stop is not None else (() if chat else ("\n",))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop)
    prompts = [_question_prompt(tokenizer, it["prompt"], True) if chat else it["prompt"] for it in items]
    outputs = []
    for i in progress(range(0, len(prompts), batch_size), desc="generation", unit="batch"):
        outputs += generate(model, tokenizer, prompts[i:i + batch_size], params,
                            **({"num_beams": num_beams} if num_beams != 1 else {}))
    outputs = [o.strip() for o in outputs]
    metrics = text_metrics(outputs, [it["references"] for it in items])
    samples = [{"prompt": it["prompt"], "output": o, "references": it["references"]} for it, o in zip(items, outputs)]
    return {"task": "generation", "n": len(items), **metrics, "predictions": samples}


def results_table(results: list[dict]) -> str:
    """A plain-text table: one row per task, one column per metric present in any of them."""
    skip = {"task", "source", "predictions"}
    keys = [k for r in results for k in r if k not in skip]
    columns = list(dict.fromkeys(keys))
    header = ["task", "source"] + columns
    rows = [[r["task"], r.get("source", "-")] + [_cell(r.get(k)) for k in columns] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def evaluate_tasks(model_name, text_file=None, mc_file=None, gen_file=None, batch_size: int = 8,
                   chat: bool = False, max_new_tokens: int = 64, device: str = "auto",
                   num_beams: int = 1) -> list[dict]:
    """Perplexity (text file), multiple choice and generation scores of any model `resolve_model`
    loads (what `llmkit eval --mc/--gen` runs). Inputs are all read and checked before scoring."""
    from pathlib import Path

    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.resolve import resolve_model
    from llmkit.utils import check_device, check_range

    if not (text_file or mc_file or gen_file):
        raise LlmkitError("nothing to evaluate: give --text, --mc and/or --gen")
    check_range("--batch-size", batch_size, 1, integer=True)
    check_range("--max-new-tokens", max_new_tokens, 1, integer=True)
    mc_items = read_mc_items(mc_file) if mc_file else None
    gen_items = read_gen_items(gen_file) if gen_file else None
    text = None
    if text_file:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LlmkitError(f"cannot read text file {text_file}: {e}") from None
    model, tokenizer = resolve_model(model_name, device=check_device(device))
    optimize_for_inference(model)
    results = []
    if text is not None:
        results.append({"task": "perplexity", "source": str(text_file),
                        **perplexity(model, text, tokenizer, batch_size=batch_size)})
    if mc_items is not None:
        results.append({"source": str(mc_file), **multiple_choice(model, tokenizer, mc_items, batch_size, chat)})
    if gen_items is not None:
        results.append({"source": str(gen_file),
                        **generation(model, tokenizer, gen_items, max_new_tokens, batch_size, chat,
                                     num_beams=num_beams)})
    return results
