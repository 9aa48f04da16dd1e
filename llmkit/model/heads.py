"""Task heads over one shared encoder: several heads trained jointly, and BERT's pretraining heads.

`MultiTaskEncoder` is an `Encoder` (same backbone weights, same names) with a `heads` dict:
  "classify"  one label per sequence, from the pooled embedding (intent)
  "pair"      one label per sentence pair ([CLS] a [SEP] b [SEP], token types 0/1), from the pooled embedding
  "tag"       one label per token (BIO slots)
  "span"      start and end logits per token (extractive QA)
Its loss is the weighted sum of the heads' cross-entropies, over the heads a batch has targets for.

`PretrainingEncoder` is BERT's pretraining model: the masked-LM head plus next-sentence prediction
(a tanh pooler over [CLS], then two logits: 0 = B follows A, 1 = B is random), as `BertForPreTraining`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.model.encoder import Encoder, EncoderConfig, dropout

HEAD_KINDS = ("classify", "pair", "tag", "span")
IGNORE = -100


def check_heads(heads: dict) -> dict:
    """{name: {"kind", "labels", "weight"}} with kinds known, label lists sized, weights non-negative."""
    if not heads:
        raise LlmkitError("a multi-task encoder needs at least one head")
    out = {}
    for name, spec in heads.items():
        kind, labels, weight = spec.get("kind"), list(spec.get("labels") or []), float(spec.get("weight", 1.0))
        if kind not in HEAD_KINDS:
            raise LlmkitError(f"head {name!r}: unknown kind {kind!r} ({', '.join(HEAD_KINDS)})")
        if kind != "span" and len(labels) < 2:
            raise LlmkitError(f"head {name!r}: a {kind} head needs at least 2 labels, got {len(labels)}")
        if not weight >= 0:
            raise LlmkitError(f"head {name!r}: loss weight must be >= 0, got {weight}")
        out[name] = {"kind": kind, "labels": labels if kind != "span" else [], "weight": weight}
    return out


class MultiTaskEncoder(Encoder):
    def __init__(self, config: EncoderConfig, heads: dict):
        super().__init__(config)
        self.task, self.head_specs = "multi", check_heads(heads)
        self.heads = nn.ModuleDict({
            name: nn.Linear(config.n_embd, 2 if spec["kind"] == "span" else len(spec["labels"]))
            for name, spec in self.head_specs.items()})
        self.heads.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, targets: dict | None = None):
        """({head: logits}, loss). classify/pair (B, L); tag (B, T, L); span (B, T, 2) = start, end.

        targets: {head: tensor}: classify/pair (B,), tag (B, T) with -100 ignored, span (B, 2) token
        positions (a window without the answer points both at [CLS], index 0, as BERT's SQuAD recipe)."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        pooled = dropout(self.pool(hidden, attention_mask), self.config.dropout, self.training)
        tokens = dropout(hidden, self.config.dropout, self.training)
        outputs, loss = {}, None
        for name, spec in self.head_specs.items():
            logits = self.heads[name](pooled if spec["kind"] in ("classify", "pair") else tokens)
            if spec["kind"] == "span" and attention_mask is not None:  # padding is never an answer
                logits = logits.masked_fill(~attention_mask.bool()[..., None], torch.finfo(logits.dtype).min)
            outputs[name] = logits
            if targets is None or name not in targets:
                continue
            term = head_loss(spec["kind"], logits, targets[name]) * spec["weight"]
            loss = term if loss is None else loss + term
        return outputs, loss

    def head_meta(self) -> dict:
        return {"task": "multi", "heads": self.head_specs}


def head_loss(kind: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if kind in ("classify", "pair"):
        return F.cross_entropy(logits, target)
    if kind == "tag":
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE)
    # span: the mean of the start and end cross-entropies over token positions
    return (F.cross_entropy(logits[..., 0], target[:, 0]) + F.cross_entropy(logits[..., 1], target[:, 1])) / 2


def multitask_from(model: Encoder, heads: dict) -> MultiTaskEncoder:
    """A MultiTaskEncoder with `model`'s embeddings and blocks and freshly initialised heads."""
    new = MultiTaskEncoder(model.config, heads)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(("mlm.", "head.", "nsp.", "heads."))}
    missing, unexpected = new.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith("heads.") for k in missing), (missing, unexpected)
    return new.to(next(model.parameters()).device)


class NSPHead(nn.Module):
    """BERT's pooler (dense + tanh over the [CLS] state) and the 2-way next-sentence classifier."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.pooler = nn.Linear(config.n_embd, config.n_embd)
        self.classifier = nn.Linear(config.n_embd, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(hidden[:, 0])))


class PretrainingEncoder(Encoder):
    """MLM + NSP, as BertForPreTraining. forward returns ((mlm logits, nsp logits), loss)."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config, task="mlm")
        self.task = "mlm+nsp"
        self.nsp = NSPHead(config)
        self.nsp.apply(self._init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_labels=None):
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        nsp_logits = self.nsp(hidden)
        if labels is None:
            return (self.mlm(hidden, self.embed.weight), nsp_logits), None
        keep = labels != IGNORE
        mlm_logits = self.mlm(hidden[keep], self.embed.weight)
        loss = F.cross_entropy(mlm_logits.float(), labels[keep]) if keep.any() else hidden.sum() * 0.0
        if next_labels is not None:
            loss = loss + F.cross_entropy(nsp_logits.float(), next_labels)
        return (mlm_logits, nsp_logits), loss


__all__ = ["HEAD_KINDS", "MultiTaskEncoder", "NSPHead", "PretrainingEncoder", "check_heads",
           "head_loss", "multitask_from"]
