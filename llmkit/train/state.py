"""Saving and restoring everything a training run needs to continue exactly.

A checkpoint is a model directory (config.json, model.safetensors, tokenizer.json; see
llmkit.io.checkpoint) plus `train_state.pt`: optimizer, grad scaler, data-sampler position, every RNG
state, step counter. With strategy=fsdp the weights and optimizer moments are instead sharded by
torch.distributed.checkpoint (llmkit.io.sharded) and train_state.pt keeps the rest.

`write` fills one directory; llmkit.io.snapshots makes that directory the run's checkpoint in one
atomic step, so a crash never pairs new weights with an old optimizer. config.json and the state
still both record the step: a hand-assembled mismatch is caught on resume.
"""
from __future__ import annotations

import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from llmkit.io.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, load_weights, read_meta, save_weights, write_config
from llmkit.errors import LlmkitError
from llmkit.io import sharded, snapshots

STATE_FILE = "train_state.pt"


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


def write(directory, model, state: dict, tokenizer_file=None, weights: bool = True) -> None:
    """Write the model directory and `train_state.pt` for `state["step"]` into `directory`.

    weights=False writes config.json without weights: they are in the sharded checkpoint beside it."""
    directory = Path(directory)
    extra = {"train_step": state["step"]}
    if weights:
        save_weights(directory, model)
        snapshots.fault_point()
    write_config(directory, model, {**extra, **({} if weights else {"sharded": sharded.SHARDS})})
    snapshots.fault_point()
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
        snapshots.fault_point()
    torch.save(state, directory / STATE_FILE)
    snapshots.fault_point()


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


def load(out_dir, model, model_config: dict, weights: bool = True) -> dict:
    """Load the latest checkpoint's weights into `model` and return its training state, checking they
    belong together. weights=False (sharded runs) checks and returns the state only."""
    out_dir = Path(out_dir)
    directory = snapshots.current(out_dir)
    if directory is None:
        raise LlmkitError(f"cannot resume: {out_dir} holds no checkpoint")
    state_path = directory / STATE_FILE
    meta = read_meta(directory)
    saved = meta.get("model", {})
    differ = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if differ:
        details = ", ".join(f"{k}={saved.get(k)!r} (now {model_config.get(k)!r})" for k in differ[:4])
        raise LlmkitError(f"cannot resume: checkpoint in {out_dir} is from another model config: {details}")
    if bool(meta.get("sharded")) == weights:
        kind = "sharded (strategy=fsdp)" if meta.get("sharded") else "whole-model (strategy=ddp)"
        raise LlmkitError(f"cannot resume: the checkpoint in {out_dir} is {kind}; resume with that strategy "
                          "(or `llmkit convert` it into a model and start from that)")
    if weights:
        load_weights(model, directory / WEIGHTS_FILE)
    return read_state(state_path, meta.get("train_step"))
