"""Sentence-pair classification: one label per pair of texts (paraphrase, entailment, answer relevance).

Data is JSONL, one pair per line:
  {"text": "book a table for two", "text_pair": "reserve a table for 2 people", "label": "same"}
(for `predict`, a .txt file with `text<TAB>text_pair` per line works too). Each pair is encoded as one
sequence, [CLS] text [SEP] text_pair [SEP] with token types 0 / 1 (a tokenizer without a pair template
just concatenates the two, the token types still marking which is which), so attention compares the
two texts token by token. The model is a MultiTaskEncoder whose "pair" head reads the pooled sequence:
the same head kind the multi-task model trains beside its other heads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkit.errors import LlmkitError
from llmkit.io.encoders import length_sorted_batches, pad_batch, read_lines, tokenize
from llmkit.model.heads import MultiTaskEncoder
from llmkit.train.tasks import Example, FinetuneConfig, _split, check_labels, label_list, score

PAIR = "pair"                      # the head's name in the MultiTaskEncoder


def _parse(record, where: str, need_gold: bool) -> Example:
    if not isinstance(record, dict):
        raise LlmkitError(f"{where}: expected a JSON object with 'text', 'text_pair' and 'label'")
    texts = record.get("text"), record.get("text_pair")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise LlmkitError(f"{where}: 'text' and 'text_pair' must be non-empty strings")
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise LlmkitError(f"{where}: 'label' must be a string")
    if need_gold and label is None:
        raise LlmkitError(f"{where}: missing 'label'")
    return Example((texts[0].strip(), texts[1].strip()), None if label is None else str(label), where)


def read_pair_examples(path, need_gold: bool = True) -> list[Example]:
    """Pairs as Examples with inputs (text, text_pair); a .txt file (prediction) holds text<TAB>text_pair lines."""
    path = Path(path)
    out = []
    for n, line in enumerate(read_lines(path), 1):
        where = f"{path}:{n}"
        if path.suffix == ".txt" and not need_gold:
            parts = line.split("\t")
            if len(parts) != 2:
                raise LlmkitError(f"{where}: expected text<TAB>text_pair (one tab), got {len(parts) - 1} tabs")
            record = {"text": parts[0], "text_pair": parts[1]}
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{where}: not valid JSON ({e.msg})") from None
        out.append(_parse(record, where, need_gold))
    return out


def encode_pairs(tokenizer, examples: list[Example], warn: bool = True) -> list[tuple[list[int], list[int]]]:
    """(token ids, token types) per pair; pairs over the model's limit are cut, the longer text first."""
    return [(e.ids, e.type_ids) for e in tokenize(tokenizer, [ex.inputs for ex in examples], "pairs", warn=warn)]


def pair_batch(features, idx: list[int], pad_id: int) -> dict:
    ids, mask = pad_batch([features[i][0] for i in idx], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": pad_batch([features[i][1] for i in idx], 0)[0]}


def finetune_pair(base: str, train_path, out_dir, val_path=None, config: FinetuneConfig | None = None,
                  log=print) -> dict:
    """Fine-tune `base` with a pair head; save to out_dir; return accuracy and macro-F1 on the validation set."""
    from llmkit.train.joint import Part, train_parts

    return train_parts(base, [Part("pair", train_path, val_path)], out_dir, config, log)


def pair_data(part, tokenizer, cfg: FinetuneConfig, max_length: int):
    """The pair head, one row per pair (ids, token types, label), and accuracy / macro-F1 (train/joint.py)."""
    from llmkit.train.joint import TaskData

    train = read_pair_examples(part.train)
    val = read_pair_examples(part.val) if part.val is not None else None
    if val is None:
        train, val = _split(train, cfg.val_fraction, cfg.seed)
    labels = label_list(train, "classify")
    check_labels(val, labels)
    features = encode_pairs(tokenizer, train)
    rows = [(ids, types, {PAIR: labels.index(e.gold)}) for (ids, types), e in zip(features, train)]

    def evaluate(model, warn: bool) -> dict:
        return score("classify", val, predict_pairs(model, tokenizer, val, warn=warn)) if val else {}

    return TaskData({PAIR: {"kind": "pair", "labels": labels, "weight": part.weight}}, rows, evaluate)


def has_pair_head(model) -> bool:
    return isinstance(model, MultiTaskEncoder) and model.head_specs.get(PAIR, {}).get("kind") == "pair"


@torch.inference_mode()
def predict_pairs(model: MultiTaskEncoder, tokenizer, examples: list[Example], batch_size: int = 32,
                  warn: bool = True) -> list[dict]:
    """{"label", "score"} per pair: the pair head's most probable label and its probability."""
    if not has_pair_head(model):
        raise LlmkitError("this model has no sentence-pair head; train one with `llmkit finetune --task pair`")
    was_training = model.training
    model.eval()
    labels = model.head_specs[PAIR]["labels"]
    features = encode_pairs(tokenizer, examples, warn)
    device = next(model.parameters()).device
    out: list[dict] = [{} for _ in examples]
    for idx in length_sorted_batches([len(f[0]) for f in features], batch_size):
        inputs = pair_batch(features, idx, model.config.pad_token_id)
        probs = model(**{k: v.to(device) for k, v in inputs.items()})[0][PAIR].float().softmax(-1).cpu()
        for row, i in enumerate(idx):
            p, k = probs[row].max(-1)
            out[i] = {"label": labels[int(k)], "score": round(float(p), 6)}
    model.train(was_training)
    return out


def run_predict_pairs(model, tokenizer, input_path, batch_size: int = 32) -> tuple[list[str], dict | None]:
    """`llmkit predict` on a pair model: JSONL lines and, when gold labels are given, accuracy and macro-F1."""
    examples = read_pair_examples(input_path, need_gold=False)
    scored = [e for e in examples if e.gold is not None]
    check_labels(scored, model.head_specs[PAIR]["labels"])  # before any output
    preds = predict_pairs(model, tokenizer, examples, batch_size)
    lines = [json.dumps({"text": e.inputs[0], "text_pair": e.inputs[1], **p}, ensure_ascii=False) + "\n"
             for e, p in zip(examples, preds)]
    gold = [(e, p) for e, p in zip(examples, preds) if e.gold is not None]
    return lines, (score("classify", *map(list, zip(*gold))) if gold else None)
