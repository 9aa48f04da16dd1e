"""Continued pretraining (`llmkit train --init-from MODEL`): start from a model llmkit loads.

The model brings its config (model.* overrides such as dropout still apply), its weights and its
tokenizer; the data must have been prepared with that tokenizer (`prepare --tokenizer MODEL`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from llmkit.errors import LlmkitError
from llmkit.model.config import ModelConfig


def load_start(source: str, data_tokenizer: Path, data_dir: Path, block_size: int, overrides: dict):
    """(model, tokenizer, config for the run); the tokenizer is checked before the weights are read."""
    from llmkit.io.resolve import load_tokenizer, resolve_model, same_tokenizer
    from llmkit.tokenizer import Tokenizer

    if not same_tokenizer(load_tokenizer(source), Tokenizer.load(data_tokenizer)):
        raise LlmkitError(f"{data_dir} was not prepared with the tokenizer of {source}; "
                          f"prepare it with `llmkit prepare ... --tokenizer {source}`")
    model, tokenizer = resolve_model(source, dtype="float32")  # trained: float weights
    config = ModelConfig.from_dict({**model.config.to_dict(), **overrides})
    if block_size > config.block_size:
        raise LlmkitError(f"block_size {block_size} exceeds the context of {source} ({config.block_size})")
    return model, tokenizer, config


def copy_weights(model: torch.nn.Module, start: torch.nn.Module, source: str, overrides: dict) -> None:
    try:
        model.load_state_dict(start.state_dict())
    except RuntimeError as e:
        raise LlmkitError(f"model settings {overrides} do not fit the weights of {source}: "
                          f"{str(e).splitlines()[0]}") from None
