"""Extractive question answering: SQuAD-style data, overlapping windows over long contexts, EM / F1.

Data is JSONL, one question per line (SQuAD v1: every question has an answer in its context):
  {"id": "q1", "context": "...", "question": "...", "answers": [{"text": "Paris", "answer_start": 17}]}
`answer_start` is a character offset into `context`; an answer whose text is not found at its offset is
an error naming the line. Question + context are encoded as a pair; contexts longer than the model's
window are split into windows that overlap by `stride` tokens, and the best span over all windows wins.
"""
from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass

import torch

from llmkit.io.encoders import length_sorted_batches, pad_batch
from llmkit.errors import LlmkitError
from llmkit.utils import read_jsonl

ANSWER = "answer"                 # the span head's name in a MultiTaskEncoder
DEFAULT_STRIDE = 16               # tokens shared by consecutive windows
MAX_ANSWER_TOKENS = 30


@dataclass
class QAExample:
    id: str
    context: str
    question: str
    answers: list[tuple[str, int]]          # (text, char offset); empty when predicting only
    where: str


def _answers(raw, context: str, where: str) -> list[tuple[str, int]]:
    if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
        raise LlmkitError(f"{where}: 'answers' must be a list of {{\"text\", \"answer_start\"}}")
    out = []
    for a in raw:
        text, start = a.get("text"), a.get("answer_start")
        if not isinstance(text, str) or not text or not isinstance(start, int) or start < 0:
            raise LlmkitError(f"{where}: each answer needs a non-empty 'text' and an 'answer_start' >= 0")
        found = context[start: start + len(text)]
        if found != text:
            raise LlmkitError(f"{where}: answer {text!r} does not match the context at offset {start} "
                              f"(the context has {found!r} there)")
        out.append((text, start))
    return out


def read_qa(path, need_answers: bool = True) -> list[QAExample]:
    examples = []
    for n, record in read_jsonl(path, "QA data"):
        where = f"{path}:{n}"
        if not isinstance(record, dict):
            raise LlmkitError(f"{where}: expected a JSON object with context, question and answers")
        context, question = record.get("context"), record.get("question")
        if not (isinstance(context, str) and context.strip() and isinstance(question, str) and question.strip()):
            raise LlmkitError(f"{where}: 'context' and 'question' must be non-empty strings")
        if need_answers and "answers" not in record:
            raise LlmkitError(f"{where}: missing 'answers'")
        answers = _answers(record.get("answers", []), context, where)
        if need_answers and not answers:
            raise LlmkitError(f"{where}: 'answers' is empty")
        examples.append(QAExample(str(record.get("id", n)), context, question.strip(), answers, where))
    return examples


# ---- windows ------------------------------------------------------------------------------------

@dataclass
class Window:
    example: int                            # index into the examples
    ids: list[int]
    type_ids: list[int]
    offsets: list[tuple[int, int] | None]   # char span in the context for context tokens, else None
    target: tuple[int, int]                 # answer token positions, (0, 0) when not inside this window


def windows(tokenizer, examples: list[QAExample], max_length: int, stride: int = DEFAULT_STRIDE) -> list[Window]:
    """Every example as one or more overlapping windows of at most max_length tokens."""
    hf = tokenizer.hf
    saved = dict(hf.truncation) if hf.truncation else None
    hf.no_truncation()
    longest = max(len(e.ids) for e in hf.encode_batch([e.question for e in examples]))
    room = max_length - longest - hf.num_special_tokens_to_add(True)  # context tokens per window
    if stride < 0 or stride >= room:  # checked here: the tokenizers library panics instead
        if saved:
            hf.enable_truncation(**saved)
        raise LlmkitError(f"--stride {stride} must be in [0, {room}): windows of {max_length} tokens leave "
                          f"{room} for the context after the longest question ({longest} tokens)")
    try:
        hf.enable_truncation(max_length, stride=stride, strategy="only_second")
        encodings = hf.encode_batch([(e.question, e.context) for e in examples])
    finally:
        hf.enable_truncation(**saved) if saved else hf.no_truncation()
    out = []
    for i, (example, enc) in enumerate(zip(examples, encodings)):
        for part in [enc, *enc.overflowing]:
            # overflow windows lose their sequence ids when the tokenizer has no pair post-processor;
            # their token types still mark the context (special tokens have empty offsets)
            seqs = part.sequence_ids if 1 in part.sequence_ids else part.type_ids
            offsets = [off if seq == 1 and off[1] > off[0] else None for off, seq in zip(part.offsets, seqs)]
            target = (0, 0)
            if example.answers:
                text, start = example.answers[0]
                target = _token_span(offsets, start, start + len(text))
            out.append(Window(i, part.ids, part.type_ids, offsets, target))
    return out


def _token_span(offsets, start: int, end: int) -> tuple[int, int]:
    """Token positions of the first and last context token of [start, end), or (0, 0) if not all inside."""
    inside = [p for p, off in enumerate(offsets) if off is not None and off[1] > start and off[0] < end]
    context = [p for p, off in enumerate(offsets) if off is not None]
    if not inside or offsets[context[0]][0] > start or offsets[context[-1]][1] < end:
        return 0, 0
    return inside[0], inside[-1]


def batch_windows(items: list[Window], pad_id: int):
    ids, mask = pad_batch([w.ids for w in items], pad_id)
    types = pad_batch([w.type_ids for w in items], 0)[0]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ---- prediction and scores ----------------------------------------------------------------------

@torch.inference_mode()
def predict_answers(model, tokenizer, examples: list[QAExample], stride: int = DEFAULT_STRIDE,
                    batch_size: int = 32, max_answer_tokens: int = MAX_ANSWER_TOKENS) -> list[dict]:
    """{"id", "answer", "score"} per example: the best-scoring span over all its windows."""
    was_training = model.training
    model.eval()
    wins = windows(tokenizer, examples, model.config.max_length, stride)
    best: list[tuple[float, str]] = [(float("-inf"), "")] * len(examples)
    device = next(model.parameters()).device
    for idx in length_sorted_batches([len(w.ids) for w in wins], batch_size):
        inputs = batch_windows([wins[i] for i in idx], model.config.pad_token_id)
        logits = model(**{k: v.to(device) for k, v in inputs.items()})[0][ANSWER].float().cpu()
        for row, i in enumerate(idx):
            score, text = _best_span(wins[i], logits[row], examples[wins[i].example].context, max_answer_tokens)
            if score > best[wins[i].example][0]:
                best[wins[i].example] = (score, text)
    model.train(was_training)
    return [{"id": e.id, "answer": text, "score": round(score, 4)} for e, (score, text) in zip(examples, best)]


def _best_span(window: Window, logits: torch.Tensor, context: str, max_tokens: int) -> tuple[float, str]:
    ctx = torch.tensor([off is not None for off in window.offsets])
    n = len(window.offsets)
    start = logits[:n, 0].masked_fill(~ctx, float("-inf"))
    end = logits[:n, 1].masked_fill(~ctx, float("-inf"))
    # pair[i, j] = start i + end j, against this window's "no answer here" score at position 0,
    # which makes scores comparable across windows
    pair = start[:, None] + end[None, :] - (logits[0, 0] + logits[0, 1])
    allowed = torch.ones(n, n, dtype=torch.bool).triu() & ~torch.ones(n, n, dtype=torch.bool).triu(max_tokens)
    pair = pair.masked_fill(~allowed, float("-inf"))
    flat = int(pair.argmax())
    i, j = divmod(flat, n)
    if pair[i, j] == float("-inf"):
        return float("-inf"), ""
    return float(pair[i, j]), context[window.offsets[i][0]: window.offsets[j][1]].strip()


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(p) & collections.Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_scores(examples: list[QAExample], preds: list[dict]) -> dict:
    """Exact match and token F1 (each the best over the gold answers), averaged, as percentages like SQuAD's."""
    em = [max(float(normalize_answer(p["answer"]) == normalize_answer(t)) for t, _ in e.answers)
          for e, p in zip(examples, preds)]
    f1 = [max(_f1(p["answer"], t) for t, _ in e.answers) for e, p in zip(examples, preds)]
    return {"exact_match": 100 * sum(em) / len(em), "f1": 100 * sum(f1) / len(f1), "examples": len(em)}
