"""Fine-tuning encoders for sequence classification and token tagging, and predicting with them.

Data is JSONL, one example per line:
  classify  {"text": "book a table for two", "label": "restaurant"}
  tag       {"tokens": ["fly", "to", "Paris"], "tags": ["O", "O", "B-city"]}
Labels are collected from the training file (sorted; "O" first for tags) and saved with the
model: in config.json ("task", "labels") and in labels.json. For tagging, each word's tag is put on
its first sub-word token; the other sub-words are ignored by the loss, and a word's prediction is
read from its first sub-word.

Training is the Trainer's (TaskTrainer below: the recipe supplies the model, its batches and its
metrics); the joint intent + slots and the QA recipes (multitask.py, qa.py) use it the same way.
"""
from __future__ import annotations

import json
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
from llmkit.train import distributed
from llmkit.train.trainer import Trainer, TrainConfig

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

    metrics = fit(model, len(features), batch, cfg, out_dir, evaluate_val, log)
    save_encoder(out_dir, model.eval(), tokenizer, extra={"base": str(base), "finetune": {"val": metrics}})
    return metrics


def _to(value, device):
    if value is None:
        return None
    return {k: _to(v, device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)


def batches_per_epoch(n_examples: int, batch_size: int, world_size: int) -> int:
    """Full batches, plus the short last one when it can still be split across the ranks."""
    full, tail = divmod(n_examples, batch_size)
    return full + (tail >= world_size)


class ExampleSampler:
    """Shuffled epochs over example indices, `batch_size` at a time (an epoch's last batch may be short).
    Under torchrun each global batch is split across ranks, and a tail too short to split is dropped."""

    def __init__(self, n_examples: int, batch_size: int, make_batch, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.make_batch = n_examples, batch_size, make_batch
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.pos = [], 0

    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.n, self.batch_size, self.world_size)

    def next_batch(self):
        if not self.order or self.pos >= self.batches_per_epoch() * self.batch_size:
            self.order, self.pos = torch.randperm(self.n, generator=self.generator).tolist(), 0
        rows = self.order[self.pos: self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.make_batch(rows[self.rank::self.world_size]), None

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.pos = list(state["order"]), int(state["pos"])


class TaskTrainer(Trainer):
    """The Trainer with a fine-tuning recipe's model, batches and metrics: `batch(indices)` gives the
    model's keyword arguments, targets included (its forward returns (output, loss)); the schedule is
    BERT's (linear warmup, linear decay to 0); validation runs the recipe's `evaluate()` once per epoch.
    The recipe saves the model itself at the end: fine-tuning runs are short and keep no checkpoints."""

    def __init__(self, model: torch.nn.Module, n_examples: int, batch, cfg: FinetuneConfig, out_dir,
                 evaluate=None, log=print):
        self.task_model, self.n_examples, self.make_batch = model, n_examples, batch
        self.task_evaluate, self.log_line, self.epochs = evaluate, log, cfg.epochs
        self.epoch_metrics: dict = {}
        world_size = distributed.detect().world_size  # the Trainer's config needs the step count first
        self.steps_per_epoch = max(1, batches_per_epoch(n_examples, cfg.batch_size, world_size))
        total = self.steps_per_epoch * cfg.epochs
        super().__init__(TrainConfig(
            data_dir="-", out_dir=str(out_dir), objective="heads", batch_size=cfg.batch_size,
            block_size=model.config.max_length, max_steps=total, lr=cfg.lr, min_lr=0.0, lr_schedule="linear",
            warmup_steps=int(cfg.warmup_fraction * total), lr_decay_steps=total, weight_decay=cfg.weight_decay,
            beta2=0.999, grad_clip=1.0, device=cfg.device, seed=cfg.seed, eval_interval=self.steps_per_epoch,
            log_interval=self.steps_per_epoch, ckpt_interval=0, progress=sys.stderr.isatty()))

    def _check_out_dir(self, resume: bool) -> None:
        pass  # the recipe writes a model dir into out_dir (atomically, file by file) when training ends

    def _load_data(self) -> None:
        self.train_tokens = self.val_tokens = None  # the recipe's features, reached through make_batch

    def build_model_config(self):
        return self.task_model.config

    def build_model(self) -> torch.nn.Module:
        model, self.task_model = self.task_model, None
        return model.train()

    def _sampler(self, data, seed: int):
        return ExampleSampler(self.n_examples, self.config.batch_size, self.make_batch, seed,
                              self.dist.rank, self.dist.world_size)

    def next_batch(self, sampler):
        batch, _ = sampler.next_batch()
        self._step_tokens += int(batch["input_ids"].numel()) * self.dist.world_size
        return _to(batch, self.device), None

    def train_step(self) -> torch.Tensor:
        self._step_tokens = 0  # batches are as wide as their longest example: count what was drawn
        loss = super().train_step()
        self.tokens_seen += self._step_tokens - self.tokens_per_step
        return loss

    def validate(self) -> None:
        epoch = self.step // self.steps_per_epoch
        metrics = {"epoch": epoch, "train_loss": self.last_metrics["loss"],
                   **(self.task_evaluate() if self.task_evaluate else {})}
        self.raw_model.train()
        self.epoch_metrics = metrics
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and k != "train_loss")
        self.log_line(f"epoch {epoch}/{self.epochs}: train loss {metrics['train_loss']:.4f}  {shown}")
        self._log({"step": self.step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}})

    def save(self) -> None:
        pass


def fit(model: torch.nn.Module, n_examples: int, batch, cfg: FinetuneConfig, out_dir, evaluate=None,
        log=print) -> dict:
    """Train `model` with a recipe's batches (see TaskTrainer); returns the last epoch's
    {"epoch", "train_loss", **evaluate()}. The model is left in eval mode."""
    trainer = TaskTrainer(model, n_examples, batch, cfg, out_dir, evaluate, log)
    trainer.fit()
    trainer.raw_model.eval()
    return trainer.epoch_metrics


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
