"""Training objectives: the losses, and the batch transforms some of them need.

Each `*_objective(model, x, y) -> loss` has the signature of `OBJECTIVES` (below), so the
Trainer runs it like the causal-LM loss. Sections:
  masked LM      BERT's 15% selection with 80/10/10 replacement; cross-entropy on selected tokens
  contrastive    InfoNCE over in-batch negatives (SimCSE: dropout views or supervised pairs)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
ENCODER_OBJECTIVES = ("mlm", "mlm+nsp", "contrastive")  # objectives that train an llmkit.model.encoder.Encoder


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / torch.compile wrappers, for reading its config."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# ---- masked language modelling ----------------------------------------------------------------

def mask_tokens(input_ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids=(),
                prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (inputs, labels).

    Each non-special token is selected with probability `prob`; of the selected, 80% become
    `mask_id`, 10% a random token and 10% stay unchanged. labels hold the original id at selected
    positions and IGNORE_INDEX elsewhere. Special tokens (separators, padding) are never selected.
    """
    shape, device = input_ids.shape, input_ids.device
    probs = torch.full(shape, prob, device=device)
    if len(special_ids):
        probs.masked_fill_(torch.isin(input_ids, torch.as_tensor(list(special_ids), device=device)), 0.0)
    selected = torch.bernoulli(probs, generator=generator).bool()
    labels = input_ids.masked_fill(~selected, IGNORE_INDEX)
    # one uniform draw per position decides the replacement: [0, .8) mask, [.8, .9) random, [.9, 1) keep
    u = torch.rand(shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, shape, generator=generator, device=device)
    inputs = torch.where(selected & (u < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(selected & (u >= 0.8) & (u < 0.9), random_ids, inputs)
    return inputs, labels


def masked_lm_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x: masked inputs (B, T), y: labels with IGNORE_INDEX at unselected positions."""
    _, loss = model(x, labels=y)
    return loss


def mlm_nsp_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BERT pretraining: MLM + next-sentence loss. y packs [mlm labels (T) | token types (T) | next label (1)]
    (llmkit/train/nsp.py), since the Trainer's batches are (x, y) pairs."""
    T = x.shape[1]
    _, loss = model(x, token_type_ids=y[:, T: 2 * T], labels=y[:, :T], next_labels=y[:, 2 * T])
    return loss


# ---- contrastive (sentence embeddings) -------------------------------------------------------

def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float = 0.05,
             symmetric: bool = False) -> torch.Tensor:
    """InfoNCE with in-batch negatives: anchor i must pick positive i among all B positives.

    Similarities are cosines divided by `temperature`. symmetric=True averages with the
    positives -> anchors direction (CLIP style).
    """
    a = F.normalize(anchors.float(), dim=-1)
    p = F.normalize(positives.float(), dim=-1)
    logits = a @ p.T / temperature
    target = torch.arange(len(a), device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    return loss


SIMCSE_TEMPERATURE = 0.05  # the SimCSE paper's value for both the unsupervised and supervised setups


def contrastive_objective(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x: anchors (B, T), y: positives (B, T'), both padded with the model's pad id.

    Unsupervised SimCSE passes the same sentences as x and y: dropout makes the two views differ.
    Both go through one forward pass (concatenated), so DDP sees a single forward per backward.
    """
    pad = _unwrap(model).config.pad_token_id
    width = max(x.shape[1], y.shape[1])
    batch = torch.cat([F.pad(x, (0, width - x.shape[1]), value=pad), F.pad(y, (0, width - y.shape[1]), value=pad)])
    emb, _ = model(batch, attention_mask=batch != pad)
    return info_nce(emb[: len(x)], emb[len(x):], SIMCSE_TEMPERATURE)


def causal_lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; y is x shifted left by one."""
    _, loss = model(x, targets=y)
    return loss


# objective name -> loss(model, x, y). Other objectives (masked LM, contrastive) register here.
OBJECTIVES: dict[str, Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "causal": causal_lm_loss,
    # encoder objectives: run by llmkit.train.encoder.EncoderTrainer, which supplies their batches
    "mlm": masked_lm_objective,
    "mlm+nsp": mlm_nsp_objective,
    "contrastive": contrastive_objective,
    # task heads (classify, tag, QA spans, several at once): run by llmkit.train.tasks.TaskTrainer (finetune),
    # whose batches are the model's keyword arguments with the targets in them
    "heads": lambda model, batch, _: model(**batch)[1],
}
