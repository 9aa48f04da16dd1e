"""Pruning: zero the least important weights (unstructured, or 2:4 semi-structured), or remove whole
layers, heads and MLP channels (llmkit.compress.structured) for a genuinely smaller model.

Unstructured scores, over the Linear layers inside the blocks (embeddings and the LM head are kept):
  magnitude  |W_ij|
  wanda      |W_ij| * ||X_j||_2, X_j the j-th input feature over the calibration tokens (Sun et al., 2023)
The lowest-scoring fraction `sparsity` is zeroed, compared within each output row ("row", Wanda's
choice), within each weight matrix ("layer"), or across all of them at once ("global"; Wanda's scores
carry each layer's activation scale, so a global cut can empty a whole matrix with small inputs). 2:4 keeps the
two highest-scoring weights of every four consecutive inputs of a row. Zeros keep the model's shape:
dense kernels are not faster on them, so this saves nothing at inference until sparse kernels do.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from llmkit.errors import LlmkitError

METHODS = ("magnitude", "wanda")
SCOPES = ("row", "layer", "global")


def prunable_linears(model) -> dict[str, torch.nn.Linear]:
    """Every Linear inside the blocks, by its module path in the model."""
    return {f"blocks.{name}": m for name, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)}


def weight_scores(weight: torch.Tensor, method: str, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """(out, in) importance of each weight: |W| for magnitude, |W| * ||X_j|| (broadcast over rows) for wanda."""
    score = weight.detach().float().abs()
    if method == "wanda":
        if input_norm is None:
            raise LlmkitError("wanda needs calibration statistics (--calib FILE)")
        score = score * input_norm.float()[None, :]
    elif method != "magnitude":
        raise LlmkitError(f"unknown pruning method {method!r} ({', '.join(METHODS)})")
    return score


def check_sparsity(sparsity: float) -> None:
    if not 0 <= sparsity < 1:
        raise LlmkitError(f"sparsity must be in [0, 1), got {sparsity}")


def _lowest(scores: torch.Tensor, k: int, dim: int | None) -> torch.Tensor:
    """Boolean mask of the k lowest scores (per row along dim=-1, or over the whole tensor)."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k == 0:
        return mask
    if dim is None:
        mask.view(-1)[scores.view(-1).topk(k, largest=False).indices] = True
    else:
        mask.scatter_(dim, scores.topk(k, dim=dim, largest=False).indices, True)
    return mask


def n_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Pruned positions for n:m sparsity: in every m consecutive inputs of a row, all but the n best."""
    rows, cols = scores.shape
    if cols % m:
        raise LlmkitError(f"{n}:{m} sparsity needs input widths divisible by {m}, got {cols}")
    return _lowest(scores.view(rows, cols // m, m), m - n, dim=-1).view(rows, cols)


@torch.no_grad()
def prune_unstructured(model, sparsity: float, method: str = "magnitude", scope: str = "row", stats=None,
                       pattern: tuple[int, int] | None = None) -> dict:
    """Zero weights in place; returns {"pruned": zeroed weights, "total": prunable weights}.
    With `pattern` (n, m) the n:m rule replaces `sparsity` and `scope`."""
    if scope not in SCOPES:
        raise LlmkitError(f"unknown scope {scope!r} ({', '.join(SCOPES)})")
    check_sparsity(sparsity)
    linears = prunable_linears(model)
    scores = {name: weight_scores(m.weight, method, stats.input_norm(name) if method == "wanda" and stats else None)
              for name, m in linears.items()}
    if pattern is not None:
        masks = {name: n_m_mask(s, *pattern) for name, s in scores.items()}
    elif scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(sparsity * flat.numel())
        # the k-th lowest score is the threshold (kthvalue, not a sort: ~100M scores for SmolLM2)
        threshold = flat.kthvalue(k).values if k else float("-inf")
        masks = {name: s <= threshold for name, s in scores.items()}
    else:
        masks = {name: _lowest(s, int(sparsity * (s.shape[1] if scope == "row" else s.numel())),
                               -1 if scope == "row" else None)
                 for name, s in scores.items()}
    pruned = 0
    for name, m in linears.items():
        m.weight[masks[name]] = 0
        pruned += int(masks[name].sum())
    return {"pruned": pruned, "total": sum(s.numel() for s in scores.values())}


def parse_count(text: str | None) -> int | None:
    """'90M' -> 90_000_000; also k/K, B/G and plain integers."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not match:
        raise LlmkitError(f"--params must be a number like 90M, 1.5B or 500000, got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text.strip())
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise LlmkitError(f"--pattern must be N:M with 0 < N < M (e.g. 2:4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def run_prune(model_name, out_dir, *, sparsity=None, method="magnitude", scope="row", pattern=None, params=None,
              layers=None, heads=None, mlp=None, calib=None, calib_tokens=8192, calib_len=256,
              layer_tokens=1024, log=print) -> dict:
    """`llmkit prune`: load, calibrate if needed, prune, save an llmkit model directory. Returns a summary."""
    from llmkit.compress import calibrate, structured
    from llmkit.io.checkpoint import save_checkpoint
    from llmkit.io.resolve import resolve_model, resolve_path

    structured_args = any(v is not None for v in (params, layers, heads, mlp))
    pattern = parse_pattern(pattern)
    if structured_args == (sparsity is not None or pattern is not None):
        raise LlmkitError("give either --sparsity/--pattern (zero weights) or --params/--layers/--heads/--mlp "
                          "(remove structures), not both or neither")
    if sparsity is not None and pattern is not None:
        raise LlmkitError("--pattern N:M sets the sparsity itself; drop --sparsity")
    check_sparsity(sparsity or 0.0)
    if method not in METHODS or scope not in SCOPES:
        raise LlmkitError(f"--method must be one of {', '.join(METHODS)} and --scope one of {', '.join(SCOPES)}")
    needs_calib = structured_args or method == "wanda"
    if needs_calib and calib is None:
        raise LlmkitError("this pruning is measured on text: give --calib FILE (plain text)")
    source, out_dir = resolve_path(model_name), Path(out_dir)
    if out_dir.exists() and out_dir.resolve() == source.resolve():
        raise LlmkitError(f"{out_dir}: the output is the source model")
    model, tokenizer = resolve_model(source, dtype="float32")  # pruned: float weights
    before = structured.count_params(model.config)
    sizes = None
    if structured_args:  # check the targets before spending time on calibration
        sizes = structured.plan_sizes(model.config, parse_count(params), layers, heads, mlp)
    stats = None
    if needs_calib:
        seq = min(calib_len, model.config.block_size)
        windows = calibrate.calibration_windows(tokenizer, calib, calib_tokens, seq)
        log(f"calibrating on {windows.numel():,} tokens of {calib}")
        stats = calibrate.collect_stats(model, windows)
    summary = {"source": str(model_name), "params_before": before}
    if sizes is not None:
        losses = None
        if sizes.layers < model.config.n_layer:
            rows = max(1, min(len(windows), layer_tokens // windows.shape[1]))
            base, losses = calibrate.layer_removal_losses(model, windows[:rows])
            log(f"loss {base:.3f}; without each layer: " + " ".join(f"{v:.2f}" for v in losses.tolist()))
        model = structured.prune_structured(model, sizes, stats, losses)
        summary.update(kind="structured", layers=sizes.layers, heads=sizes.heads, mlp=sizes.mlp)
    else:
        done = prune_unstructured(model, sparsity or 0.0, method, scope, stats, pattern)
        summary.update(kind="unstructured", method=method, scope=scope, sparsity=done["pruned"] / done["total"],
                       pattern=None if pattern is None else f"{pattern[0]}:{pattern[1]}")
    summary["params_after"] = structured.count_params(model.config)
    save_checkpoint(out_dir, model, tokenizer, extra={"pruning": summary})
    return summary
