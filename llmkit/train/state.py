"""Saving and restoring everything a training run needs to continue exactly.

A checkpoint is the model directory (config.json, model.safetensors,
tokenizer.json; see llmkit.io.checkpoint) plus `train_state.pt` beside it:
optimizer, grad scaler, data-sampler position, every RNG state, step counter.

All files are first written completely into a staging directory inside
out_dir and only then moved into place, state file last. A failure while
writing leaves the previous checkpoint untouched. config.json and the state
both record the step and are moved first and last, so a crash between the
renames is detected on resume instead of silently pairing new weights with
an old optimizer.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from llmkit.io.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load_weights, read_meta, save_checkpoint
from llmkit.errors import LlmkitError
from llmkit.utils import atomic_path

STATE_FILE = "train_state.pt"
STAGING_DIR = ".checkpoint-staging"


def capture_rng() -> dict:
    """Python, NumPy and torch RNG states as plain lists and tensors (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir, model, state: dict, tokenizer_file=None) -> None:
    """Write the model directory and `train_state.pt` for `state["step"]` into out_dir."""
    out_dir = Path(out_dir)
    stage = out_dir / STAGING_DIR
    shutil.rmtree(stage, ignore_errors=True)
    try:
        save_checkpoint(stage, model, extra={"train_step": state["step"]})
        if tokenizer_file is not None:
            with atomic_path(stage / TOKENIZER_FILE) as tmp:
                shutil.copyfile(tokenizer_file, tmp)
        with atomic_path(stage / STATE_FILE) as tmp:
            torch.save(state, tmp)
        # Everything is complete on disk: now swap it in. config.json (which records the step) goes
        # first and the state last, so any partial swap leaves their steps different.
        for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, STATE_FILE):
            if (stage / name).exists():
                os.replace(stage / name, out_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def read_state(path, weights_step) -> dict:
    """torch.load a train_state.pt (tensors and plain containers only) and check it matches the
    step recorded with the weights (`weights_step`, from config.json or an adapter config)."""
    path = Path(path)
    if not path.exists():
        raise LlmkitError(f"cannot resume: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise LlmkitError(f"cannot resume: corrupt training state {path}: {str(e).splitlines()[0]}") from None
    required = ("step", "tokens_seen", "optimizer", "sampler", "rng")
    if not isinstance(state, dict) or any(k not in state for k in required):
        raise LlmkitError(f"cannot resume: {path} is not an llmkit training state")
    if weights_step != state["step"]:
        raise LlmkitError(f"cannot resume: weights in {path.parent} are from step {weights_step} "
                          f"but {path.name} is from step {state['step']} (interrupted save?)")
    return state


def load(out_dir, model, model_config: dict) -> dict:
    """Load weights into `model` and return the training state, checking they belong together."""
    out_dir = Path(out_dir)
    state_path = out_dir / STATE_FILE
    if not state_path.exists():
        raise LlmkitError(f"cannot resume: {state_path} does not exist")
    meta = read_meta(out_dir)
    saved = meta.get("model", {})
    differ = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if differ:
        details = ", ".join(f"{k}={saved.get(k)!r} (now {model_config.get(k)!r})" for k in differ[:4])
        raise LlmkitError(f"cannot resume: checkpoint in {out_dir} is from another model config: {details}")
    load_weights(model, out_dir / WEIGHTS_FILE)
    return read_state(state_path, meta.get("train_step"))
