"""Fine-tuning encoders for sequence classification and token tagging, and predicting with them.

Data is JSONL, one example per line:
  classify  {"text": "book a table for two", "label": "restaurant"}
  tag       {"tokens": ["fly", "to", "Paris"], "tags": ["O", "O", "B-city"]}
Labels are collected from the training file (sorted; "O" first for tags) and saved with the
model: in config.json ("task", "labels") and in labels.json. For tagging, each word's tag is put on
its first sub-word token; the other sub-words are ignored by the loss, and a word's prediction is
read from its first sub-word.
"""
from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.io.encoders import length_sorted_batches, load_encoder, pad_batch, read_lines, save_encoder, tokenize
from llmkit.errors import LlmkitError
from llmkit.eval.metrics import accuracy, entity_scores, macro_f1
from llmkit.model.encoder import Encoder, with_head
from llmkit.tokenizer import Tokenizer
from llmkit.utils import progress

FIELDS = {"classify": ("text", "label"), "tag": ("tokens", "tags")}


@dataclass
class Example:
    inputs: str | list[str]            # text (classify) or words (tag)
    gold: str | list[str] | None       # label, tags, or None when the file has none
    where: str                         # "file:line", for error messages


# ---- data ---------------------------------------------------------------------------------------

def _check_task(task: str) -> None:
    if task not in FIELDS:
        raise LlmkitError(f"unknown task {task!r} (classify, tag)")


def _parse(record, task: str, where: str, need_gold: bool) -> Example:
    in_key, gold_key = FIELDS[task]
    if not isinstance(record, dict):
        raise LlmkitError(f"{where}: expected a JSON object with {in_key!r} and {gold_key!r}")
    value, gold = record.get(in_key), record.get(gold_key)
    if task == "classify":
        if not isinstance(value, str) or not value.strip():
            raise LlmkitError(f"{where}: 'text' must be a non-empty string")
        if gold is not None and not isinstance(gold, (str, int)):
            raise LlmkitError(f"{where}: 'label' must be a string")
        gold = None if gold is None else str(gold)
    else:
        if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
            raise LlmkitError(f"{where}: 'tokens' must be a non-empty list of non-empty strings")
        if gold is not None:
            if not isinstance(gold, list) or not all(isinstance(t, str) for t in gold):
                raise LlmkitError(f"{where}: 'tags' must be a list of strings")
            if len(gold) != len(value):
                raise LlmkitError(f"{where}: {len(value)} tokens but {len(gold)} tags")
    if need_gold and gold is None:
        raise LlmkitError(f"{where}: missing {gold_key!r}")
    return Example(value, gold, where)


def read_examples(path, task: str, need_gold: bool = True) -> list[Example]:
    """JSONL examples (or, for prediction, plain text: one text per line; words split on spaces)."""
    _check_task(task)
    path = Path(path)
    examples = []
    for n, line in enumerate(read_lines(path), 1):
        where = f"{path}:{n}"
        if path.suffix == ".txt" and not need_gold:
            record = {FIELDS[task][0]: line if task == "classify" else line.split()}
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{where}: not valid JSON ({e.msg})") from None
        examples.append(_parse(record, task, where, need_gold))
    return examples


def label_list(examples: list[Example], task: str) -> list[str]:
    """Sorted label names seen in training; tagging puts "O" first."""
    seen = {e.gold for e in examples} if task == "classify" else {t for e in examples for t in e.gold}
    labels = sorted(seen - {"O"}) if task == "tag" else sorted(seen)
    labels = (["O"] if "O" in seen else []) + labels if task == "tag" else labels
    if len(labels) < 2:
        raise LlmkitError(f"training data has {len(labels)} distinct label(s); a {task} model needs at least 2")
    return labels


def check_labels(examples: list[Example], labels: list[str]) -> None:
    """Every gold label must be one the model knows: anything else is a user error, never skipped."""
    known = set(labels)
    for e in examples:
        for label in ([e.gold] if isinstance(e.gold, str) else e.gold or []):
            if label not in known:
                raise LlmkitError(f"{e.where}: unknown label {label!r}; the model knows {', '.join(labels)}")


def encode_examples(tokenizer: Tokenizer, examples: list[Example], task: str, labels: list[str] | None,
                    warn: bool = True):
    """Token ids per example, plus gold label ids (classify: int; tag: per token, -100 off first sub-words)
    and, for tagging, the position of each word's first sub-word (None if truncated away)."""
    encodings = tokenize(tokenizer, [e.inputs for e in examples], "examples", pretokenized=task == "tag", warn=warn)
    index = {label: i for i, label in enumerate(labels or [])}
    features = []
    for e, enc in zip(examples, encodings):
        first = {}
        if task == "tag":
            for pos, w in enumerate(enc.word_ids):
                if w is not None and w not in first:
                    first[w] = pos
        if e.gold is None or labels is None:
            target = None
        elif task == "classify":
            target = index[e.gold]
        else:
            target = [-100] * len(enc.ids)
            for w, pos in first.items():
                target[pos] = index[e.gold[w]]
        features.append((enc.ids, target, [first.get(w) for w in range(len(e.inputs))] if task == "tag" else None))
    return features


# ---- prediction and evaluation ------------------------------------------------------------------

@torch.inference_mode()
def predict(model: Encoder, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32,
            warn: bool = True) -> list[dict]:
    """One record per example: {"label", "score"} (classify) or {"tags"} (tag); words cut off by
    truncation are tagged "O"."""
    if model.task not in FIELDS:
        raise LlmkitError(f"this model has no classify/tag head (task {model.task!r}); fine-tune it first")
    was_training = model.training
    model.eval()
    features = encode_examples(tokenizer, examples, model.task, None, warn)
    device = next(model.parameters()).device
    out: list[dict] = [{} for _ in examples]
    for idx in length_sorted_batches([len(f[0]) for f in features], batch_size):
        ids, mask = pad_batch([features[i][0] for i in idx], model.config.pad_token_id)
        logits, _ = model(ids.to(device), attention_mask=mask.to(device))
        probs = logits.float().softmax(-1).cpu()
        for row, i in enumerate(idx):
            if model.task == "classify":
                score, k = probs[row].max(-1)
                out[i] = {"label": model.labels[int(k)], "score": round(float(score), 6)}
            else:
                best = probs[row].argmax(-1).tolist()
                out[i] = {"tags": [model.labels[best[p]] if p is not None else "O" for p in features[i][2]]}
    model.train(was_training)
    return out


def score(task: str, examples: list[Example], preds: list[dict]) -> dict:
    """classify: accuracy and macro-F1. tag: entity-level precision/recall/F1 and token accuracy."""
    if task == "classify":
        gold, pred = [e.gold for e in examples], [p["label"] for p in preds]
        return {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred), "examples": len(examples)}
    gold, pred = [e.gold for e in examples], [p["tags"] for p in preds]
    scores = entity_scores(gold, pred)
    flat_gold, flat_pred = [t for g in gold for t in g], [t for p in pred for t in p]
    return {"entity_f1": scores["f1"], "entity_precision": scores["precision"], "entity_recall": scores["recall"],
            "token_accuracy": accuracy(flat_gold, flat_pred), "per_type_f1": scores["per_type_f1"],
            "examples": len(examples)}


def evaluate(model: Encoder, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32,
             warn: bool = True) -> dict:
    check_labels(examples, model.labels)
    return score(model.task, examples, predict(model, tokenizer, examples, batch_size, warn))


def format_metrics(metrics: dict) -> str:
    keys = ("accuracy", "macro_f1", "entity_f1", "entity_precision", "entity_recall", "token_accuracy")
    return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)


# ---- fine-tuning --------------------------------------------------------------------------------

@dataclass
class FinetuneConfig:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 5e-5                 # BERT fine-tuning range is 2e-5..1e-4; tiny models from scratch want more
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1     # of all steps; then linear decay to 0
    val_fraction: float = 0.1        # held out from the training file when no validation file is given
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise LlmkitError("epochs, batch size and learning rate must be positive")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.warmup_fraction < 1:
            raise LlmkitError("val_fraction and warmup_fraction must be in [0, 1)")


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    n_val = int(round(len(examples) * fraction))
    if n_val == 0 or n_val >= len(examples):
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def _batch(features, idx, pad_id: int, task: str):
    ids, mask = pad_batch([features[i][0] for i in idx], pad_id)
    if task == "classify":
        return ids, mask, torch.tensor([features[i][1] for i in idx])
    return ids, mask, pad_batch([features[i][1] for i in idx], -100)[0]


def finetune(base: str, train_path, out_dir, task: str, val_path=None, config: FinetuneConfig | None = None,
             log=print) -> dict:
    """Fine-tune encoder `base` (name or dir) on `train_path`; save to `out_dir`; return the val metrics."""
    _check_task(task)
    cfg = config or FinetuneConfig()
    train = read_examples(train_path, task)
    val = read_examples(val_path, task) if val_path is not None else None
    if val is None:
        train, val = _split(train, cfg.val_fraction, cfg.seed)
    labels = label_list(train, task)
    check_labels(val, labels)
    base_model, tokenizer = load_encoder(base, cfg.device)
    torch.manual_seed(cfg.seed)  # the new head's init
    model = with_head(base_model, task, labels).train()
    del base_model
    features = encode_examples(tokenizer, train, task, labels)

    def batch(idx):
        ids, mask, target = _batch(features, idx, model.config.pad_token_id, task)
        return {"input_ids": ids, "attention_mask": mask, "labels": target}

    first = [True]

    def evaluate_val():
        warn, first[0] = first[0], False
        return evaluate(model, tokenizer, val, warn=warn) if val else {}

    metrics = fit(model, len(features), batch, cfg, evaluate_val, log)
    save_encoder(out_dir, model.eval(), tokenizer, extra={"base": str(base), "finetune": {"val": metrics}})
    return metrics


def _to(value, device):
    return {k: _to(v, device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)


def fit(model: torch.nn.Module, n_examples: int, batch, cfg: FinetuneConfig, evaluate=None, log=print) -> dict:
    """The fine-tuning loop of every encoder task recipe: AdamW, linear warmup then linear decay to zero,
    clipping at 1. `batch(indices)` gives the model's keyword arguments (targets included: its forward
    returns (output, loss)). Returns the last epoch's {"epoch", "train_loss", **evaluate()}."""
    from llmkit.train.optim import build_adamw, set_lr

    optimizer = build_adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), torch.device(cfg.device).type)
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    total, warmup = steps_per_epoch * cfg.epochs, int(cfg.warmup_fraction * steps_per_epoch * cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)  # shuffling and dropout masks repeat run to run
    torch.manual_seed(cfg.seed)
    step, metrics = 0, {}
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n_examples, generator=gen).tolist()
        running = 0.0
        for b in progress(range(0, n_examples, cfg.batch_size), desc=f"epoch {epoch}", unit="batch"):
            ramp = (step + 1) / warmup if step < warmup else (total - step) / max(1, total - warmup)
            set_lr(optimizer, cfg.lr * ramp)
            _, loss = model(**_to(batch(order[b: b + cfg.batch_size]), cfg.device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            step += 1
        metrics = {"epoch": epoch, "train_loss": running / steps_per_epoch, **(evaluate() if evaluate else {})}
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "train_loss")
        log(f"epoch {epoch}/{cfg.epochs}: train loss {metrics['train_loss']:.4f}  {shown}")
    model.eval()
    return metrics


def run_predict(model_path, input_path, out_path=None, batch_size: int = 32, device: str = "cpu") -> dict | None:
    """`llmkit predict`: predictions as JSONL (to out_path, atomically, or stdout); metrics if gold is given."""
    from llmkit.utils import atomic_open

    model, tokenizer = load_encoder(model_path, device)
    if model.task not in FIELDS:
        raise LlmkitError(f"{model_path} has no classify/tag head (task {model.task!r}); "
                          "use `llmkit finetune` first, or `llmkit embed` for embeddings")
    examples = read_examples(input_path, model.task, need_gold=False)
    scored = [e for e in examples if e.gold is not None]
    check_labels(scored, model.labels)  # before any output: no half-written file on a bad label
    preds = predict(model, tokenizer, examples, batch_size)
    key = FIELDS[model.task][0]
    lines = [json.dumps({key: e.inputs, **p}, ensure_ascii=False) + "\n" for e, p in zip(examples, preds)]
    if out_path is None:
        sys.stdout.writelines(lines)
    else:
        with atomic_open(out_path, encoding="utf-8") as f:
            f.writelines(lines)
    pairs = [(e, p) for e, p in zip(examples, preds) if e.gold is not None]
    return score(model.task, *map(list, zip(*pairs))) if pairs else None
