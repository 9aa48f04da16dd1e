"""Fine-tuning an encoder for extractive QA: a span head (start/end per token) over question+context windows.

Each window of a long context is one training row; a window that does not contain the answer is
trained to point at position 0 (BERT's SQuAD recipe), and prediction only reads context tokens.
"""
from __future__ import annotations

from llmkit.apps.qa import ANSWER, DEFAULT_STRIDE, predict_answers, qa_scores, read_qa, windows
from llmkit.io.encoders import load_encoder
from llmkit.model.heads import MultiTaskEncoder
from llmkit.train.tasks import FinetuneConfig, _split


def finetune_qa(base: str, train_path, out_dir, val_path=None, config: FinetuneConfig | None = None,
                stride: int = DEFAULT_STRIDE, log=print) -> dict:
    """Fine-tune `base` for span QA on SQuAD-style JSONL; save to out_dir; return EM/F1 on the validation set."""
    from llmkit.train.joint import Part, train_parts

    return train_parts(base, [Part("qa", train_path, val_path, stride=stride)], out_dir, config, log)


def qa_data(part, tokenizer, cfg: FinetuneConfig, max_length: int):
    """The span head, one row per window (ids, token types, answer token span), and EM / F1 (train/joint.py)."""
    from llmkit.train.joint import TaskData

    stride = DEFAULT_STRIDE if part.stride is None else part.stride
    train = read_qa(part.train)
    val = read_qa(part.val) if part.val is not None else None
    if val is None:
        train, val = _split(train, cfg.val_fraction, cfg.seed)
    rows = [(w.ids, w.type_ids, {ANSWER: w.target}) for w in windows(tokenizer, train, max_length, stride)]

    def evaluate(model, warn: bool) -> dict:
        return qa_scores(val, predict_answers(model, tokenizer, val, stride)) if val else {}

    return TaskData({ANSWER: {"kind": "span", "weight": part.weight}}, rows, evaluate)


def evaluate_qa(model_path, data_path, stride: int = DEFAULT_STRIDE, device: str = "cpu") -> dict:
    """`llmkit eval --qa`: exact match and F1 of a span-QA model on SQuAD-style JSONL."""
    from llmkit.errors import LlmkitError

    model, tokenizer = load_encoder(model_path, device)
    if not isinstance(model, MultiTaskEncoder) or ANSWER not in model.head_specs:
        raise LlmkitError(f"{model_path} has no span (QA) head; train one with `llmkit finetune --task qa`")
    examples = read_qa(data_path)
    preds = predict_answers(model, tokenizer, examples, stride)
    return {**qa_scores(examples, preds), "predictions": preds}


def run_predict_qa(model, tokenizer, input_path, batch_size: int = 32) -> tuple[list[str], dict | None]:
    """`llmkit predict` on a QA model: {"id", "question", "answer", "score"} lines; EM / F1 when every
    question has gold answers."""
    import json

    examples = read_qa(input_path, need_answers=False)
    preds = predict_answers(model, tokenizer, examples, batch_size=batch_size)
    lines = [json.dumps({"id": p["id"], "question": e.question, "answer": p["answer"], "score": p["score"]},
                        ensure_ascii=False) + "\n" for e, p in zip(examples, preds)]
    return lines, (qa_scores(examples, preds) if all(e.answers for e in examples) else None)
