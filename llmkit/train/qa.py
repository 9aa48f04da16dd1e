"""Fine-tuning an encoder for extractive QA: a span head (start/end per token) over question+context windows.

Each window of a long context is one training row; a window that does not contain the answer is
trained to point at position 0 (BERT's SQuAD recipe), and prediction only reads context tokens.
"""
from __future__ import annotations

import torch

from llmkit.apps.qa import ANSWER, DEFAULT_STRIDE, batch_windows, predict_answers, qa_scores, read_qa, windows
from llmkit.io.encoders import load_encoder, save_encoder
from llmkit.model.heads import MultiTaskEncoder, multitask_from
from llmkit.train.tasks import FinetuneConfig, _split, fit


def finetune_qa(base: str, train_path, out_dir, val_path=None, config: FinetuneConfig | None = None,
                stride: int = DEFAULT_STRIDE, log=print) -> dict:
    """Fine-tune `base` for span QA on SQuAD-style JSONL; save to out_dir; return EM/F1 on the validation set."""
    cfg = config or FinetuneConfig()
    train = read_qa(train_path)
    val = read_qa(val_path) if val_path is not None else None
    if val is None:
        train, val = _split(train, cfg.val_fraction, cfg.seed)
    base_model, tokenizer = load_encoder(base, cfg.device)
    torch.manual_seed(cfg.seed)
    model = multitask_from(base_model, {ANSWER: {"kind": "span"}})
    del base_model
    rows = windows(tokenizer, train, model.config.max_length, stride)
    pad = model.config.pad_token_id

    def batch(idx):
        items = [rows[i] for i in idx]
        return {**batch_windows(items, pad), "targets": {ANSWER: torch.tensor([w.target for w in items])}}

    def evaluate():
        return qa_scores(val, predict_answers(model, tokenizer, val, stride)) if val else {}

    metrics = fit(model, len(rows), batch, cfg, out_dir, evaluate, log)
    save_encoder(out_dir, model, tokenizer, extra={"base": str(base), "finetune": {"val": metrics}})
    return metrics


def evaluate_qa(model_path, data_path, stride: int = DEFAULT_STRIDE, device: str = "cpu") -> dict:
    """`llmkit eval --qa`: exact match and F1 of a span-QA model on SQuAD-style JSONL."""
    from llmkit.errors import LlmkitError

    model, tokenizer = load_encoder(model_path, device)
    if not isinstance(model, MultiTaskEncoder) or ANSWER not in model.head_specs:
        raise LlmkitError(f"{model_path} has no span (QA) head; train one with `llmkit finetune --task qa`")
    examples = read_qa(data_path)
    preds = predict_answers(model, tokenizer, examples, stride)
    return {**qa_scores(examples, preds), "predictions": preds}
