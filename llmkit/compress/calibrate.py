"""What pruning measures on calibration text: input activation norms, head and channel contributions,
and the loss a model loses when one of its layers is taken out.

All statistics come from forward hooks on the plain model (no model code changes):
  input_sq[name]   (in_features,) sum over calibration tokens of x_j^2 for every Linear inside the
                   blocks: ||X_j||_2^2, the activation half of Wanda's score |W_ij| * ||X_j||_2;
  head_sq[layer]   (n_head,) sum over tokens of ||y_h W_o[:, h]^T||^2, each attention head's
                   contribution to the residual stream (the o-projection of that head's output alone).
An MLP channel's contribution needs no hook: it is rank one, ||h_j||_2 * ||W_down[:, j]||_2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError


def calibration_windows(tokenizer, text_file, n_tokens: int, seq_len: int) -> torch.Tensor:
    """The first n_tokens of a text file's tokens as (n, seq_len) rows (at least one full row)."""
    if n_tokens < 1 or seq_len < 2:
        raise LlmkitError(f"calibration needs positive sizes, got {n_tokens} tokens in rows of {seq_len}")
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read calibration text {text_file}: {e}") from None
    ids = tokenizer.encode(text)
    rows = min(len(ids), n_tokens) // seq_len
    if rows < 1:
        raise LlmkitError(f"calibration text {text_file} has {len(ids)} tokens, fewer than one row of {seq_len}")
    return torch.tensor(ids[:rows * seq_len], dtype=torch.long).view(rows, seq_len)


@dataclass
class ActivationStats:
    tokens: int = 0
    input_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    head_sq: dict[int, torch.Tensor] = field(default_factory=dict)

    def input_norm(self, name: str) -> torch.Tensor:
        """||X_j||_2 per input feature of the Linear `name` (its module path in the model)."""
        if name not in self.input_sq:
            raise LlmkitError(f"no calibration statistics for {name}")
        return self.input_sq[name].sqrt()

    def channel_importance(self, model, layer: int) -> torch.Tensor:
        """Each MLP channel's contribution to the residual stream: ||h_j|| * ||W_down[:, j]||."""
        down = model.blocks[layer].mlp.proj
        return self.input_norm(f"blocks.{layer}.mlp.proj") * down.weight.detach().float().norm(dim=0)

    def group_importance(self, model, layer: int) -> torch.Tensor:
        """Per KV group (n_kv_head,): the summed contribution of the query heads that share it."""
        attn = model.blocks[layer].attn
        return self.head_sq[layer].sqrt().view(attn.n_kv_head, -1).sum(-1)


def _linear_hook(stats: ActivationStats, name: str):
    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        stats.input_sq[name] = stats.input_sq.get(name, 0) + x.pow(2).sum(0)
    return hook


def _head_hook(stats: ActivationStats, layer: int, attn):
    def hook(module, args):
        x = args[0].detach().float()
        H, D = attn.n_head, attn.head_dim
        heads = x.reshape(-1, H, D)                                        # (N, H, D)
        w = module.weight.detach().float().view(-1, H, D)                  # (C, H, D)
        out = torch.einsum("nhd,chd->hnc", heads, w)                       # each head's o-projection
        stats.head_sq[layer] = stats.head_sq.get(layer, 0) + out.pow(2).sum((1, 2))
    return hook


@torch.no_grad()
def collect_stats(model, windows: torch.Tensor, batch_size: int = 4) -> ActivationStats:
    """One forward pass over the calibration rows with hooks on every Linear inside the blocks."""
    stats, handles = ActivationStats(), []
    model.eval()
    try:
        for name, module in model.blocks.named_modules():
            if isinstance(module, torch.nn.Linear):
                handles.append(module.register_forward_pre_hook(_linear_hook(stats, f"blocks.{name}")))
        for i, block in enumerate(model.blocks):
            handles.append(block.attn.proj.register_forward_pre_hook(_head_hook(stats, i, block.attn)))
        device = next(model.parameters()).device
        for first in range(0, len(windows), batch_size):
            model(windows[first:first + batch_size].to(device))
        stats.tokens = windows.numel()
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def layer_removal_losses(model, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(loss of the whole model, (n_layer,) loss with each single block skipped) on the rows.

    The input of every block is recorded in one pass, so skipping block i only reruns blocks i+1..
    (about half the cost of n_layer full passes)."""
    model.eval()
    blocks, inputs = model.blocks, []
    handles = [b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in blocks]
    device = next(model.parameters()).device
    x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
    try:
        logits, _ = model(x)
    finally:
        for handle in handles:
            handle.remove()
    T = x.shape[1]
    rope = model.rope(T) if model.rope is not None else None

    def loss_from(h, start):
        for block in blocks[start:]:
            h = block(h, rope)
        out = model.lm_head(model.final_norm(h))
        return F.cross_entropy(out.float().flatten(0, 1), y.flatten()).item()

    base = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    skipped = [loss_from(inputs[i], i + 1) for i in range(len(blocks))]
    if not all(math.isfinite(v) for v in [base, *skipped]):
        raise LlmkitError("calibration loss is not finite; the model or the text is broken")
    return base, torch.tensor(skipped)
