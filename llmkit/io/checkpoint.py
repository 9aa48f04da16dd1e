"""Model directories on disk: config.json + model.safetensors + tokenizer.json.

This is the one format every llmkit command reads and writes. Training state
(optimizer, RNG, data position) lives beside it in the trainer's own file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.utils import atomic_open, atomic_path, check_state, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def save_checkpoint(out_dir, model, tokenizer=None, extra: dict | None = None) -> Path:
    """Write model weights, config and tokenizer into `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    save_weights(out_dir, model)
    write_config(out_dir, model, extra)
    if tokenizer is not None:
        tokenizer.save(out_dir / TOKENIZER_FILE)
    return out_dir


def save_weights(out_dir, model) -> None:
    """model.safetensors, atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage; safetensors refuses aliases, so store each tensor once.
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def write_config(out_dir, model, extra: dict | None = None) -> None:
    """config.json: the architecture, the model config and `extra` (e.g. the training step)."""
    meta = {"arch": getattr(model, "arch", "decoder"), "model": model.config.to_dict(), **(extra or {})}
    with atomic_open(Path(out_dir) / CONFIG_FILE) as f:
        json.dump(meta, f, indent=2)


def read_meta(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"no such model: {path}")
    return read_json(path / CONFIG_FILE, missing=f"{path} is not an llmkit model directory (no {CONFIG_FILE})")


def load_weights(model: torch.nn.Module, weights_path) -> None:
    """Load safetensors weights into `model`, naming the file and the first mismatch on failure."""
    try:
        state = load_file(str(weights_path))
    except FileNotFoundError:
        raise LlmkitError(f"missing weights file {weights_path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmkitError(f"corrupt weights file {weights_path}: {e}") from None
    if getattr(model.config, "tie_embeddings", False):
        state.setdefault("lm_head.weight", state.get("embed.weight"))
    check_state(state, model.state_dict(), weights_path)
    model.load_state_dict(state, strict=True)


def load_model_weights(model: torch.nn.Module, path: Path, meta: dict) -> None:
    """Weights from model.safetensors, or from the shards a strategy=fsdp run wrote (gathered here)."""
    if meta.get("sharded"):
        from llmkit.io import sharded

        sharded.load_weights(path / sharded.SHARDS, model)
    else:
        load_weights(model, path / WEIGHTS_FILE)


def weight_names(path: Path, meta: dict) -> set[str]:
    """The tensor names stored in a model directory (empty when unreadable: loading reports that)."""
    from safetensors import safe_open

    try:
        if meta.get("sharded"):
            from llmkit.io import sharded

            return sharded.weight_names(path / sharded.SHARDS)
        with safe_open(str(path / WEIGHTS_FILE), "pt") as f:
            return set(f.keys())
    except Exception:  # noqa: BLE001 - a missing or corrupt file is reported by the load that follows
        return set()


def load_checkpoint(path, device="cpu"):
    """Load (model, tokenizer) from an llmkit model directory."""
    from llmkit.model.decoder import GPT
    from llmkit.tokenizer import Tokenizer

    path = Path(path)
    meta = read_meta(path)
    if meta.get("arch", "decoder") == "seq2seq":
        from llmkit.model.seq2seq import Seq2Seq, Seq2SeqConfig
        model = Seq2Seq(Seq2SeqConfig.from_dict(meta["model"]))
    elif meta.get("arch", "decoder") != "decoder":
        raise LlmkitError(f"{path} holds a {meta['arch']!r} model, not a decoder")
    else:
        model = GPT(ModelConfig.from_dict(meta["model"]))
    load_model_weights(model, path, meta)
    tok_path = path / TOKENIZER_FILE
    if not tok_path.exists():
        raise LlmkitError(f"missing tokenizer {tok_path}")
    tokenizer = Tokenizer.load(tok_path)
    return model.to(device).eval(), tokenizer
