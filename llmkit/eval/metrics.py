"""Classification and tagging metrics: accuracy, macro-F1, and entity-level F1 over BIO tags.

Entity extraction follows the conlleval / seqeval default: an entity starts at B-X, or at an
I-X that does not continue an entity of type X; it ends before O, B-*, or a tag of another type.
"""
from __future__ import annotations

from collections import Counter


def accuracy(gold: list, pred: list) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def macro_f1(gold: list, pred: list) -> float:
    """Unweighted mean of per-class F1 over every class that occurs in gold or predictions."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    classes = sorted(set(gold) | set(pred), key=str)
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        scores.append(_f1(tp, fp, fn)[2])
    return sum(scores) / len(scores)


def _split(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare type 'PER' counts as 'I-PER'."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in ("B", "I"):
        return prefix, kind
    return "I", tag


def bio_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, start, end) with `end` exclusive."""
    spans, start, kind = [], None, ""
    for i, tag in enumerate(list(tags) + ["O"]):  # the trailing O closes an entity at the end
        prefix, t = _split(tag)
        continues = prefix == "I" and start is not None and t == kind
        if start is not None and not continues:
            spans.append((kind, start, i))
            start = None
        if prefix in ("B", "I") and not continues:
            start, kind = i, t
    return spans


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro precision / recall / F1 over exact-match entities, plus per-type F1."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted")
    tp, n_gold, n_pred = Counter(), Counter(), Counter()
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"sequence of {len(g)} gold tags has {len(p)} predicted tags")
        gs, ps = set(bio_spans(g)), set(bio_spans(p))
        n_gold.update(s[0] for s in gs)
        n_pred.update(s[0] for s in ps)
        tp.update(s[0] for s in gs & ps)
    precision, recall, f1 = _f1(sum(tp.values()), sum(n_pred.values()) - sum(tp.values()),
                                sum(n_gold.values()) - sum(tp.values()))
    per_type = {k: _f1(tp[k], n_pred[k] - tp[k], n_gold[k] - tp[k])[2] for k in sorted(n_gold | n_pred)}
    return {"precision": precision, "recall": recall, "f1": f1, "per_type_f1": per_type}
