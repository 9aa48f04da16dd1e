"""Offline weight quantization into GGUF's block formats: round-to-nearest and GPTQ.

    llmkit quantize MODEL --to q8_0|q4_0|q4_1 --out DIR [--method rtn|gptq] [--calib FILE] [--eval FILE]

Every linear layer of the transformer blocks is cut into blocks of 32 input values per output row.
`rtn` rounds each block on its own (gguf's quantizer: llama.cpp's reference rounding). `gptq`
(Frantar et al., 2022) quantizes one column at a time and spreads each column's rounding error over
the columns not yet quantized, weighted by the inverse Hessian X^T X of the layer's inputs on a
calibration text; each block's scale (and Q4_1 minimum) is set from the already-updated weights
when the quantizer reaches it, so the result is again plain Q4/Q8 blocks. The token embedding (and a
tied lm_head) is stored as q8_0 whatever --to says, as llama.cpp's own Q4 files do.

The output is an llmkit directory: config.json (with "quantization": per-module formats),
model.safetensors (uint8 blocks under "<module>.blocks", float tensors as usual), tokenizer.json.
resolve_model loads it with the blocks memory-mapped (llmkit.infer.quant); --dtype expands it.
"""
from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from llmkit.errors import LlmkitError
from llmkit.infer.quant import FORMATS, QK, QuantWeight, build_quantized_model, check_blockable

EMBEDDING_FORMAT = "q8_0"
METHODS = ("rtn", "gptq")


def rtn_blocks(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round-to-nearest blocks of a float (out, in) matrix (gguf's quantizer)."""
    data = weight.detach().float().contiguous().numpy()
    return torch.from_numpy(np.ascontiguousarray(gguf_quantize(data, GGMLQuantizationType(FORMATS[fmt]))))


def _group_params(w: torch.Tensor, fmt: str):
    """(scale, offset, q range) of one 32-column group per row as llama.cpp picks them, fp16-rounded."""
    if fmt == "q8_0":
        d = w.abs().amax(1) / 127
        return d.half().float(), torch.zeros_like(d), (-127, 127)
    if fmt == "q4_0":  # the value of largest magnitude maps to -8
        extreme = w.gather(1, w.abs().argmax(1, keepdim=True)).squeeze(1)
        d = (extreme / -8).half().float()
        return d, -8 * d, (0, 15)
    low, high = w.amin(1), w.amax(1)
    return ((high - low) / 15).half().float(), low.half().float(), (0, 15)


def _pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, fmt: str) -> np.ndarray:
    """ggml bytes of integer values q (out, in) with per-group scales d and minimums m (out, in / 32)."""
    rows, groups = d.shape
    scale = d.numpy().astype(np.float16).view(np.uint8).reshape(rows, groups, 2)
    qs = q.numpy().reshape(rows, groups, QK)
    if fmt == "q8_0":
        return np.concatenate([scale, qs.astype(np.int8).view(np.uint8)], -1).reshape(rows, -1)
    nibbles = (qs[..., :16] | (qs[..., 16:] << 4)).astype(np.uint8)
    parts = [scale] + ([m.numpy().astype(np.float16).view(np.uint8).reshape(rows, groups, 2)] if fmt == "q4_1" else [])
    return np.concatenate(parts + [nibbles], -1).reshape(rows, -1)


def gptq_blocks(weight: torch.Tensor, hessian: torch.Tensor, fmt: str, damp: float = 0.01) -> torch.Tensor:
    """GPTQ with groups of 32 (see the module docstring); hessian is X^T X of the layer's inputs."""
    W = weight.detach().double().clone()
    out, n = W.shape
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(out, n, dtype=torch.int64)
    ds, ms = torch.zeros(out, n // QK), torch.zeros(out, n // QK)
    for g in range(n // QK):
        a, b = g * QK, (g + 1) * QK
        d, offset, (lo, hi) = _group_params(W[:, a:b].float(), fmt)
        ds[:, g], ms[:, g] = d, offset
        safe = torch.where(d == 0, torch.ones_like(d), d).double()
        errors = torch.zeros(out, QK, dtype=torch.float64)
        for i in range(a, b):
            q = torch.round((W[:, i] - offset.double()) / safe).clamp(lo, hi)
            Q[:, i] = q.long()
            err = (W[:, i] - (q * d.double() + offset.double())) / Hinv[i, i]
            W[:, i:b] -= err[:, None] * Hinv[i, i:b][None, :]
            errors[:, i - a] = err
        W[:, b:] -= errors @ Hinv[a:b, b:]
    if fmt == "q4_0":
        ms.zero_()
    return torch.from_numpy(np.ascontiguousarray(_pack(Q, ds, ms, fmt)))


def quantized_modules(model) -> list[str]:
    """Names of the linear layers inside the transformer blocks."""
    return [name for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]


def input_hessians(model, names: list[str], calibration: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """X^T X of every named layer's inputs over the calibration tokens, in windows of `window`."""
    sums = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
        return record
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for start in range(0, max(1, len(calibration) - 1), window):
                model(calibration[start:start + window][None])
    finally:
        for h in handles:
            h.remove()
    return sums


def quantize_model(model, fmt: str, method: str = "rtn", calibration: torch.Tensor | None = None,
                   window: int = 512, hessians: dict[str, torch.Tensor] | None = None) -> dict[str, QuantWeight]:
    """Blocks for every linear layer of `model` (a float GPT) and its token embedding. gptq takes the
    layers' input Hessians from `hessians` if given (input_hessians' result: one pass serves every format)."""
    if fmt not in FORMATS:
        raise LlmkitError(f"unsupported quantization format {fmt!r} (supported: {', '.join(FORMATS)})")
    if method not in METHODS:
        raise LlmkitError(f"unknown quantization method {method!r} (supported: {', '.join(METHODS)})")
    names = quantized_modules(model)
    for name in names + ["embed"]:
        check_blockable(name, model.get_submodule(name).weight.shape)
    if method == "rtn":
        hessians = {}
    elif hessians is None:
        if calibration is None or len(calibration) < 2:
            raise LlmkitError("gptq needs a calibration text (--calib) of at least two tokens")
        hessians = input_hessians(model, names, calibration, window)
    weights = {}
    for name in names:
        w = model.get_submodule(name).weight
        weights[name] = QuantWeight(fmt, gptq_blocks(w, hessians[name], fmt) if name in hessians else rtn_blocks(w, fmt))
    weights["embed"] = QuantWeight(EMBEDDING_FORMAT, rtn_blocks(model.embed.weight, EMBEDDING_FORMAT))
    if model.config.tie_embeddings:
        weights["lm_head"] = weights["embed"]
    else:
        weights["lm_head"] = QuantWeight(EMBEDDING_FORMAT, rtn_blocks(model.lm_head.weight, EMBEDDING_FORMAT))
    return weights


def save_quantized(out_dir, model, tokenizer, weights: dict[str, QuantWeight], extra: dict | None = None) -> Path:
    """An llmkit directory holding the blocks (see the module docstring), each file written atomically."""
    from safetensors.torch import save_file

    from llmkit.io.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
    from llmkit.utils import atomic_open, atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    quantized = {n for n in weights}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not (k.endswith(".weight") and k.removesuffix(".weight") in quantized)}
    stored = {}
    for name, w in weights.items():
        if name == "lm_head" and w is weights.get("embed"):
            continue  # tied: stored once
        state[name + ".blocks"] = w.blocks.contiguous()
        stored[name] = w.format
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    meta = {"arch": "decoder", "model": model.config.to_dict(),
            "quantization": {"modules": stored, "tied_lm_head": "lm_head" not in stored}, **(extra or {})}
    with atomic_open(out_dir / CONFIG_FILE) as f:
        json.dump(meta, f, indent=2)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    return out_dir


def _mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a view of one copy-on-write memory map (nothing is read
    until used). The format: an 8-byte header length, a JSON header, then the raw tensor bytes."""
    dtypes = {"U8": torch.uint8, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        size = int.from_bytes(buf[:8], "little")
        header = json.loads(buf[8:8 + size])
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            count = (end - begin) // dtypes[info["dtype"]].itemsize
            if 8 + size + end > len(buf) or count != math.prod(info["shape"]):
                raise ValueError(f"tensor {name} is truncated")
            flat = torch.frombuffer(buf, dtype=dtypes[info["dtype"]], count=count, offset=8 + size + begin)
            tensors[name] = flat.view(info["shape"])
        return tensors
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise LlmkitError(f"cannot read quantized weights {path}: {e}") from None


def load_quantized(path, meta: dict, expand: bool = False):
    """(model, tokenizer) from an `llmkit quantize` directory; `expand` gives a float32 model instead."""
    from llmkit.io.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE
    from llmkit.model.config import ModelConfig
    from llmkit.io.common import build_model
    from llmkit.tokenizer import Tokenizer

    path = Path(path)
    config = ModelConfig.from_dict(meta["model"])
    tensors = _mapped_safetensors(path / WEIGHTS_FILE)
    spec = meta["quantization"]
    weights = {}
    for name, fmt in spec["modules"].items():
        if name + ".blocks" not in tensors:
            raise LlmkitError(f"{path}: quantized weights of {name} are missing")
        weights[name] = QuantWeight(fmt, tensors.pop(name + ".blocks"))
    if spec.get("tied_lm_head") and "embed" in weights:
        weights["lm_head"] = weights["embed"]
    if expand:
        from llmkit.infer.quant import dequantize
        tensors.update({n + ".weight": dequantize(w.blocks, w.format) for n, w in weights.items()})
        model = build_model(config, tensors, path)
    else:
        model = build_quantized_model(config, tensors, weights, path)
    return model, Tokenizer.load(path / TOKENIZER_FILE)


def _read_tokens(tokenizer, path) -> np.ndarray:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read text {path}: {e}") from None
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def quantize_command(src, out, fmt: str, method: str, text, eval_text=None, calib_tokens: int = 8192,
                     eval_tokens: int = 4096, window: int = 512) -> dict:
    """`llmkit quantize`: quantize `src`, save it to `out`, and measure perplexity before and after on
    held-out tokens: `eval_text`, or else the last 10% of `text`, whose first 90% calibrates gptq.
    Up to 8192 calibration tokens: with 2048, SmolLM2's q4_0 GPTQ fit them better than round-to-nearest
    but held-out text no better (perplexity 41.61 vs RTN's 41.58); with 8192, 40.70 (quant_quality.py)."""
    from llmkit.eval.lm import perplexity
    from llmkit.io.resolve import resolve_model

    if fmt not in FORMATS:
        raise LlmkitError(f"unsupported quantization format {fmt!r} (supported: {', '.join(FORMATS)})")
    if method not in METHODS:
        raise LlmkitError(f"unknown quantization method {method!r} (supported: {', '.join(METHODS)})")
    model, tokenizer = resolve_model(src, dtype="float32")
    tokens = _read_tokens(tokenizer, text)
    split = int(len(tokens) * 0.9) if eval_text is None else len(tokens)
    held_out = tokens[split:] if eval_text is None else _read_tokens(tokenizer, eval_text)
    held_out = held_out[:eval_tokens]
    if len(held_out) < 2:
        raise LlmkitError(f"the held-out text has {len(held_out)} tokens; perplexity needs at least 2")
    calibration = torch.from_numpy(tokens[:min(split, calib_tokens)])
    window = min(window, model.config.block_size)
    weights = quantize_model(model, fmt, method, calibration, window)
    save_quantized(out, model, tokenizer, weights, extra={"quantized_from": str(src), "method": method})
    before = perplexity(model, held_out, block_size=window)
    del model
    quantized, _ = resolve_model(out)
    after = perplexity(quantized, held_out, block_size=window)
    return {"format": fmt, "method": method, "tokens": after["tokens"], "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"], "out": str(out)}
