"""Optimizer and learning-rate schedule for training.

AdamW with decoupled weight decay applied only to the weight matrices of linear
layers: decaying norms, biases or embedding tables pulls them towards zero
for no benefit (the usual GPT-2/nanoGPT recipe).
"""
from __future__ import annotations

import inspect
import math

import torch

# Parameter names ending like this are embedding tables even though they are 2-D.
NO_DECAY_NAMES = ("embed.weight", "pos_embed.weight")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (>=2-D matrices) and a non-decayed one."""
    embedding_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                        for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    # named_parameters() yields a tied Parameter once, under its first name (embed.weight),
    # so the tied lm_head is never decayed twice or decayed as an embedding.
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = name.endswith(NO_DECAY_NAMES) or id(p) in embedding_params
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                device_type: str, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused kernel when this torch has it for the device.

    torch >= 2.4 ships fused AdamW for CPU as well as CUDA: one kernel per tensor
    instead of a dozen elementwise ops, which matters for small models.
    """
    if fused is None:
        fused = device_type in ("cpu", "cuda") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    kwargs = {"fused": True} if fused else {"foreach": True}
    try:
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, **kwargs)
    except RuntimeError:
        # e.g. an older torch without a fused CPU kernel: the multi-tensor path is next best
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, foreach=True)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from lr/warmup_steps to lr over the first `warmup_steps` steps,
    then cosine decay to `min_lr` at `decay_steps`, constant afterwards.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def inverse_sqrt_lr(step: int, lr: float, warmup_steps: int) -> float:
    """Vaswani et al.'s schedule with `lr` as its peak: linear warmup over `warmup_steps`, then
    lr * sqrt(warmup_steps / step) (the paper's d_model^-0.5 * min(step^-0.5, step * warmup^-1.5))."""
    step, warmup = step + 1, max(1, warmup_steps)
    return lr * min(step / warmup, (warmup / step) ** 0.5)


def linear_lr(step: int, lr: float, warmup_steps: int, decay_steps: int) -> float:
    """BERT's fine-tuning schedule: linear warmup over `warmup_steps`, then linear decay to 0 at `decay_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * max(0, decay_steps - step) / max(1, decay_steps - warmup_steps)
