"""Pictures of a run: training curves from metrics.jsonl and attention maps of a model.

Everything renders with matplotlib's Agg backend (no display needed) into PNG files,
written atomically. Attention probabilities are not kept by the model (SDPA never forms
them), so `attention_maps` captures each chosen block's attention input with a hook and
recomputes softmax(q k^T / sqrt(d)) from the block's own projections, outside the forward.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402

from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.utils import atomic_path, read_jsonl  # noqa: E402

METRICS_FILE = "metrics.jsonl"
# (panel title, y label, metric keys drawn in it, log scale)
PANELS = [
    ("loss", "loss (nats/token)", ("loss", "val_loss"), False),
    ("learning rate", "lr", ("lr",), False),
    ("throughput", "tokens/s", ("tokens_per_s",), False),
    ("model FLOPs utilisation", "MFU", ("mfu",), False),
]


def read_metrics(path) -> list[dict]:
    """Records of a metrics.jsonl file (or a run directory holding one); bad lines name their number."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    records = []
    for number, record in read_jsonl(path, "metrics file"):
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            raise LlmkitError(f"{path}:{number}: a metrics record needs a numeric 'step'")
        records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_metrics(path, out_png, title: str | None = None) -> Path:
    """One PNG with a panel per metric group present in the run (loss, lr, throughput, MFU)."""
    records = read_metrics(path)
    panels = [p for p in PANELS if any(_series(records, key)[0] for key in p[2])]
    if not panels:
        raise LlmkitError(f"{path}: no loss, lr or throughput values to plot")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, ylabel, keys, log) in zip(axes[:, 0], panels):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3, label=key)
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or str(path))
    fig.tight_layout()
    return _save(fig, out_png)


def _save(fig, out_png) -> Path:
    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out_png


def _select(requested, available: int, what: str) -> list[int]:
    """Indices from a user list (None = all); negative counts from the end; out of range is an error."""
    if requested is None:
        return list(range(available))
    chosen = []
    for i in requested:
        j = i + available if i < 0 else i
        if not 0 <= j < available:
            raise LlmkitError(f"{what} {i} does not exist (the model has {available})")
        chosen.append(j)
    return chosen


@torch.no_grad()
def attention_maps(model, ids: list[int], layers=None, heads=None) -> tuple[torch.Tensor, list[int], list[int]]:
    """Attention probabilities (len(layers), len(heads), T, T) of a decoder on one token sequence.

    Each chosen block's attention module is hooked to capture its (normed) input and rotary
    tables; q and k are rebuilt from its own qkv projection, so adapters or fused weights are
    honoured, and the causal softmax is taken here. Returns (maps, layers, heads).
    """
    from llmkit.model.layers import apply_rotary

    cfg = model.config
    layers = _select(layers, cfg.n_layer, "layer")
    heads = _select(heads, cfg.n_head, "head")
    if not ids:
        raise LlmkitError("attention maps need at least one token")
    captured: dict[int, tuple] = {}

    def hook_for(layer):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["x"]
            rope = args[1] if len(args) > 1 else kwargs.get("rope")
            captured[layer] = (module, x, rope)
        return hook

    handles = [model.blocks[i].attn.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in layers]
    was_training = model.training
    model.eval()
    try:
        model(torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    maps = []
    for layer in layers:
        attn, x, rope = captured[layer]
        B, T, _ = x.shape
        H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
        q, k, _ = attn.qkv(x).float().split((H * D, K * D, K * D), dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, K, D).transpose(1, 2)
        if rope is not None:
            cos, sin = (t.float() for t in rope)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k = k.repeat_interleave(H // K, dim=1)  # grouped-query: each kv head serves H/K query heads
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        maps.append(probs[0, heads].cpu())
    return torch.stack(maps), layers, heads


def plot_attention(maps: torch.Tensor, tokens: list[str], out_png, layers: list[int], heads: list[int],
                   title: str | None = None) -> Path:
    """A grid of heatmaps, one per (layer, head): rows = query token, columns = key token."""
    n_rows, n_cols = maps.shape[0], maps.shape[1]
    T = maps.shape[-1]
    cell = max(2.2, min(0.28 * T, 6.0))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols + 1, cell * n_rows + 0.8), squeeze=False)
    labels = [t.replace("\n", "\\n") for t in tokens]
    show_labels = T <= 40  # beyond that the tick labels overlap into a smear
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            image = ax.imshow(maps[r, c].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layers[r]} head {heads[c]}", fontsize=9)
            if show_labels:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
                ax.set_yticks(range(T), labels, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    fig.suptitle(title or "attention (row: query, column: key)")
    return _save(fig, out_png)


def attention_png(model, tokenizer, text: str, out_png, layers=None, heads=None) -> Path:
    """Tokenize `text`, compute the chosen maps and draw them (the `llmkit attention` command).

    Default: every head of the last layer (all layers of a 30-layer model make an unreadable grid)."""
    layers = [-1] if layers is None else layers
    ids = tokenizer.encode(text)
    if len(ids) > model.config.block_size:
        raise LlmkitError(f"text is {len(ids)} tokens, longer than the model's context of {model.config.block_size}")
    maps, layers, heads = attention_maps(model, ids, layers, heads)
    tokens = [tokenizer.decode([i]) for i in ids]
    return plot_attention(maps, tokens, out_png, layers, heads, title=f"attention: {text[:60]!r}")
