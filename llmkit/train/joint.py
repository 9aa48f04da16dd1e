"""Several heads on one encoder, trained jointly from several data files: `llmkit finetune MIXTURE --task multi`.

A mixture file (YAML) lists the parts; data paths are relative to the mixture file:
  parts:
    - {task: intent-slots, train: data/booking_train.jsonl, val: data/booking_test.jsonl, weight: 1.0}
    - {task: pair, train: data/pairs_train.jsonl, val: data/pairs_test.jsonl, weight: 1.0}
    - {task: qa, train: data/qa_train.jsonl, val: data/qa_dev.jsonl, weight: 0.5, stride: 16}
Each task brings its heads (intent-slots: "intent" classify + "slots" tag; pair: "pair"; qa: "answer" span)
and its training rows. The rows of all parts are shuffled together, so a batch mixes tasks: every row
carries the targets its task has, the others are ignored (-100), and the loss is the sum over heads of
weight x the head's mean cross-entropy over the rows that have its target. Each epoch scores every part
on its validation data with its own metrics ("pair/accuracy", "qa/exact_match", ...).
The single-task recipes (multitask.py, pair.py, qa.py) are this with one part.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from llmkit.errors import LlmkitError
from llmkit.io.encoders import load_encoder, pad_batch, save_encoder
from llmkit.model.heads import IGNORE, multitask_from
from llmkit.train.tasks import FinetuneConfig, fit
from llmkit.utils import check_mapping, read_yaml

PART_KEYS = {"task", "train", "val", "weight", "stride"}


@dataclass
class Part:
    task: str                 # intent-slots, pair or qa
    train: Path
    val: Path | None = None   # None: a tenth of `train` is held out
    weight: float = 1.0       # multiplies the loss of each of the task's heads
    stride: int | None = None  # qa: tokens shared by consecutive windows


@dataclass
class TaskData:
    """One part, ready to train: its heads, its rows (token ids, token types or None, {head: target}) and
    `evaluate(model, warn)` -> its metrics on the part's validation data."""
    heads: dict
    rows: list[tuple[list[int], list[int] | None, dict]]
    evaluate: Callable[..., dict]


def builders() -> dict[str, Callable]:
    """task -> (part, tokenizer, cfg, max_length) -> TaskData."""
    from llmkit.train.multitask import intent_slots_data
    from llmkit.train.pair import pair_data
    from llmkit.train.qa import qa_data

    return {"intent-slots": intent_slots_data, "pair": pair_data, "qa": qa_data}


def read_mixture(path) -> list[Part]:
    """The parts of a mixture file, checked: known tasks, each at most once, files present, weights >= 0."""
    path = Path(path)
    raw = check_mapping(read_yaml(path, "mixture file"), str(path), {"parts"})
    if not isinstance(raw.get("parts"), list) or not raw["parts"]:
        raise LlmkitError(f"{path}: 'parts' must be a non-empty list of {{task, train, val, weight}}")
    parts, tasks = [], builders()
    for n, spec in enumerate(raw["parts"], 1):
        where = f"{path}: part {n}"
        spec = check_mapping(spec, where, PART_KEYS)
        if spec.get("task") not in tasks:
            raise LlmkitError(f"{where}: task must be one of {', '.join(tasks)}, got {spec.get('task')!r}")
        if spec["task"] in [p.task for p in parts]:
            raise LlmkitError(f"{where}: task {spec['task']!r} is listed twice (one part per task)")
        files = {}
        for key in ("train", "val"):
            if spec.get(key) is None and key == "val":
                continue
            if not isinstance(spec.get(key), str) or not (path.parent / spec[key]).is_file():
                raise LlmkitError(f"{where}: {key} file {spec.get(key)!r} not found (paths are relative to "
                                  f"{path.parent})")
            files[key] = path.parent / spec[key]
        weight, stride = spec.get("weight", 1.0), spec.get("stride")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise LlmkitError(f"{where}: weight must be a number >= 0, got {weight!r}")
        if stride is not None and (spec["task"] != "qa" or isinstance(stride, bool) or not isinstance(stride, int)):
            raise LlmkitError(f"{where}: stride is an integer, for task qa only")
        parts.append(Part(spec["task"], files["train"], files.get("val"), float(weight), stride))
    return parts


def mixed_batch(rows, idx: list[int], heads: dict, pad_id: int) -> dict:
    """The model's keyword arguments for rows `idx`: padded ids, mask, token types (when any row has them)
    and, per head that some row has a target for, targets with IGNORE where a row has none."""
    items = [rows[i] for i in idx]
    ids, mask = pad_batch([r[0] for r in items], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "targets": {}}
    if any(r[1] is not None for r in items):
        batch["token_type_ids"] = pad_batch([r[1] if r[1] is not None else [0] * len(r[0]) for r in items], 0)[0]
    for name, spec in heads.items():
        if not any(name in r[2] for r in items):
            continue  # a head no row trains: left out (a mean over no rows is NaN)
        if spec["kind"] == "tag":
            target = pad_batch([r[2].get(name, [IGNORE] * len(r[0])) for r in items], IGNORE)[0]
        elif spec["kind"] == "span":
            target = torch.tensor([r[2].get(name, (IGNORE, IGNORE)) for r in items])
        else:
            target = torch.tensor([r[2].get(name, IGNORE) for r in items])
        batch["targets"][name] = target
    return batch


def train_parts(base: str, parts: list[Part], out_dir, config: FinetuneConfig | None = None, log=print) -> dict:
    """Fine-tune encoder `base` with every part's heads at once; save to out_dir; return the last epoch's
    metrics (a single part's unprefixed, as its own recipe reports them; several parts' as "task/metric")."""
    cfg = config or FinetuneConfig()
    base_model, tokenizer = load_encoder(base, cfg.device)
    tasks = builders()
    data = [tasks[p.task](p, tokenizer, cfg, base_model.config.max_length) for p in parts]
    heads = {name: spec for d in data for name, spec in d.heads.items()}
    torch.manual_seed(cfg.seed)  # the heads' init
    model = multitask_from(base_model, heads)
    del base_model
    rows = [row for d in data for row in d.rows]
    first = [True]

    def evaluate() -> dict:
        warn, first[0] = first[0], False
        if len(parts) == 1:
            return data[0].evaluate(model, warn)
        return {f"{p.task}/{k}": v for p, d in zip(parts, data) for k, v in d.evaluate(model, warn).items()}

    metrics = fit(model, len(rows), lambda idx: mixed_batch(rows, idx, heads, model.config.pad_token_id), cfg,
                  out_dir, evaluate, log)
    mixture = [{"task": p.task, "train": str(p.train), "weight": p.weight} for p in parts]
    save_encoder(out_dir, model, tokenizer, extra={"base": str(base), "finetune": {"val": metrics, "parts": mixture}})
    return metrics


# ---- predicting with a multi-task model ---------------------------------------------------------

def input_task(model, path) -> str:
    """Which of the model's tasks reads the file at `path`: qa for {context, question} records, pair for
    {text, text_pair} (or .txt lines with a tab), intent-slots otherwise; one clear error if the model
    lacks that task's heads."""
    import json

    from llmkit.apps.qa import ANSWER
    from llmkit.io.encoders import read_lines
    from llmkit.train.multitask import is_intent_slots
    from llmkit.train.pair import has_pair_head

    first = read_lines(path)[0]
    try:
        record = json.loads(first) if not str(path).endswith(".txt") else {}
    except ValueError:
        record = {}
    record = record if isinstance(record, dict) else {}
    if "context" in record or "question" in record:
        task, present = "qa", ANSWER in model.head_specs
    elif "text_pair" in record or (str(path).endswith(".txt") and "\t" in first):
        task, present = "pair", has_pair_head(model)
    else:
        task, present = "intent-slots", is_intent_slots(model)
    if not present:
        raise LlmkitError(f"{path} holds {task} examples, but this model has no {task} heads (it has "
                          f"{', '.join(model.head_specs)}); train them with `llmkit finetune --task {task}`")
    return task


def predict_multi(model, tokenizer, path, batch_size: int = 32) -> tuple[list[str], dict | None]:
    """`llmkit predict` on a multi-task model: JSONL lines from the head the input is for, and, when the
    input has gold labels, the scores (with "shown", their one-line summary)."""
    from llmkit.train.multitask import run_predict_joint
    from llmkit.train.pair import run_predict_pairs
    from llmkit.train.qa import run_predict_qa
    from llmkit.train.tasks import format_metrics

    task = input_task(model, path)
    if task == "qa":
        lines, metrics = run_predict_qa(model, tokenizer, path, batch_size)
        shown = metrics and f"exact_match {metrics['exact_match']:.2f}  f1 {metrics['f1']:.2f}"
    elif task == "pair":
        lines, metrics = run_predict_pairs(model, tokenizer, path, batch_size)
        shown = metrics and format_metrics(metrics)
    else:
        lines, metrics = run_predict_joint(model, tokenizer, path)
        shown = metrics and f"intent_accuracy {metrics['intent_accuracy']:.4f}  slot_f1 {metrics['slot_f1']:.4f}"
    return lines, (None if metrics is None else {**metrics, "shown": shown})
