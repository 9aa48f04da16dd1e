"""Joint fine-tuning of one encoder with several heads; the intent + slots recipe and its predictions.

Intent-slots data is JSONL, one utterance per line, with both labels:
  {"tokens": ["table", "for", "4", "at", "7pm"], "tags": ["O", "O", "B-people", "O", "B-time"], "label": "book_table"}
(a "text" field may sit beside them, so the same file also trains the single-task classify model).
One model holds an intent head (classify, pooled) and a slot head (tag, per word's first sub-word);
the loss is CE(intent) + CE(slots) (train/joint.py, which also trains them beside other tasks' heads).
`predict` gives both at once.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkit.io.encoders import length_sorted_batches, pad_batch, read_lines
from llmkit.errors import LlmkitError
from llmkit.eval.metrics import accuracy, bio_spans, entity_scores
from llmkit.model.heads import MultiTaskEncoder
from llmkit.train.tasks import (Example, FinetuneConfig, _parse, _split, check_labels, encode_examples, label_list)

INTENT, SLOTS = "intent", "slots"


# ---- data ---------------------------------------------------------------------------------------

def read_joint(path, need_gold: bool = True) -> list[tuple[Example, str | None]]:
    """(words + tags as a tag Example, intent label) per line; .txt lines (words split on spaces) to predict."""
    path = Path(path)
    out = []
    for n, line in enumerate(read_lines(path), 1):
        where = f"{path}:{n}"
        if path.suffix == ".txt" and not need_gold:
            out.append((Example(line.split(), None, where), None))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{where}: not valid JSON ({e.msg})") from None
        example = _parse(record, "tag", where, need_gold)
        label = record.get("label")
        if label is not None and not isinstance(label, str):
            raise LlmkitError(f"{where}: 'label' (the intent) must be a string")
        if need_gold and label is None:
            raise LlmkitError(f"{where}: missing 'label' (the intent)")
        out.append((example, label))
    return out


def _labels(rows, intents: list[str], slots: list[str]) -> None:
    check_labels([e for e, _ in rows], slots)
    check_labels([Example(e.inputs, label, e.where) for e, label in rows if label is not None], intents)


# ---- intent + slots -----------------------------------------------------------------------------

def finetune_intent_slots(base: str, train_path, out_dir, val_path=None, config: FinetuneConfig | None = None,
                          log=print) -> dict:
    """Fine-tune `base` with an intent head and a slot head, jointly; save to out_dir; return val metrics."""
    from llmkit.train.joint import Part, train_parts

    return train_parts(base, [Part("intent-slots", train_path, val_path)], out_dir, config, log)


def intent_slots_data(part, tokenizer, cfg: FinetuneConfig, max_length: int):
    """The intent and slot heads, one row per utterance with both targets, and the joint scores (joint.py)."""
    from llmkit.train.joint import TaskData

    train = read_joint(part.train)
    val = read_joint(part.val) if part.val is not None else None
    if val is None:
        train, val = _split(train, cfg.val_fraction, cfg.seed)
    intents = label_list([Example(e.inputs, label, e.where) for e, label in train], "classify")
    slots = label_list([e for e, _ in train], "tag")
    _labels(val, intents, slots)
    heads = {INTENT: {"kind": "classify", "labels": intents, "weight": part.weight},
             SLOTS: {"kind": "tag", "labels": slots, "weight": part.weight}}
    features = encode_examples(tokenizer, [e for e, _ in train], "tag", slots)
    rows = [(ids, None, {INTENT: intents.index(label), SLOTS: tags})
            for (ids, tags, _), (_, label) in zip(features, train)]

    def evaluate(model, warn: bool) -> dict:
        return score_joint(val, predict_joint(model, tokenizer, [e for e, _ in val], warn=warn)) if val else {}

    return TaskData(heads, rows, evaluate)


def is_intent_slots(model) -> bool:
    """An intent head and a slot head (beside them a multi-task model may have others)."""
    return isinstance(model, MultiTaskEncoder) and {INTENT, SLOTS} <= set(model.head_specs)


def check_joint(model) -> None:
    if not is_intent_slots(model):
        raise LlmkitError("this model is not a joint intent-slots model; train one with "
                          "`llmkit finetune --task intent-slots`")


def slot_values(words: list[str], tags: list[str]) -> dict[str, str]:
    """{slot: its words joined by spaces}; a slot tagged twice keeps its last span (the latest mention)."""
    return {kind: " ".join(words[start:end]) for kind, start, end in bio_spans(tags)}


@torch.inference_mode()
def predict_joint(model: MultiTaskEncoder, tokenizer, examples: list[Example], batch_size: int = 32,
                  warn: bool = True) -> list[dict]:
    """{"intent", "score", "tags", "slots"} per example; words cut off by truncation are tagged "O"."""
    check_joint(model)
    was_training = model.training
    model.eval()
    intents, slots = model.head_specs[INTENT]["labels"], model.head_specs[SLOTS]["labels"]
    features = encode_examples(tokenizer, examples, "tag", None, warn)
    device = next(model.parameters()).device
    out: list[dict] = [{} for _ in examples]
    for idx in length_sorted_batches([len(f[0]) for f in features], batch_size):
        ids, mask = pad_batch([features[i][0] for i in idx], model.config.pad_token_id)
        logits, _ = model(ids.to(device), attention_mask=mask.to(device))
        probs = logits[INTENT].float().softmax(-1).cpu()
        best_tags = logits[SLOTS].argmax(-1).cpu()
        for row, i in enumerate(idx):
            score, k = probs[row].max(-1)
            tags = [slots[int(best_tags[row, p])] if p is not None else "O" for p in features[i][2]]
            out[i] = {"intent": intents[int(k)], "score": round(float(score), 6), "tags": tags,
                      "slots": slot_values(examples[i].inputs, tags)}
    model.train(was_training)
    return out


def score_joint(rows, preds: list[dict]) -> dict:
    """Intent accuracy and seqeval-style (exact span) slot precision / recall / F1."""
    scored = [(e, label, p) for (e, label), p in zip(rows, preds) if label is not None]
    spans = entity_scores([e.gold for e, _, _ in scored], [p["tags"] for _, _, p in scored])
    return {"intent_accuracy": accuracy([label for _, label, _ in scored], [p["intent"] for _, _, p in scored]),
            "slot_f1": spans["f1"], "slot_precision": spans["precision"], "slot_recall": spans["recall"],
            "examples": len(scored)}


def is_joint(path) -> bool:
    """True for an llmkit encoder dir whose config.json names a multi-task model (no loading)."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("task") == "multi"
    except (OSError, ValueError, AttributeError):
        return False


def run_predict_joint(model, tokenizer, input_path) -> tuple[list[str], dict | None]:
    """`llmkit predict` on a joint model: JSONL lines and, when gold is given, the scores."""
    check_joint(model)
    rows = read_joint(input_path, need_gold=False)
    _labels(rows, model.head_specs[INTENT]["labels"], model.head_specs[SLOTS]["labels"])  # before any output
    preds = predict_joint(model, tokenizer, [e for e, _ in rows])
    lines = [json.dumps({"tokens": e.inputs, **p}, ensure_ascii=False) + "\n" for (e, _), p in zip(rows, preds)]
    gold = [(r, p) for r, p in zip(rows, preds) if r[1] is not None and r[0].gold is not None]
    return lines, (score_joint(*map(list, zip(*gold))) if gold else None)
