"""Sharded checkpoints with torch.distributed.checkpoint (DCP), for strategy=fsdp.

Every rank writes its own shard of the weights and optimizer moments into one `shards/` directory;
DCP's metadata records where each slice of each tensor lives, so the same directory loads at any
world size (resharding happens on load) and, without a process group, into a plain unsharded model.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from llmkit.errors import LlmkitError

SHARDS = "shards"


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    return dcp, sd


def _states(model, optimizer, frozen: bool):
    """This rank's shards of model and optimizer; frozen=False leaves out frozen parameters (LoRA's
    base weights: they never change, so every checkpoint would write the same gigabytes again)."""
    _, sd = _dcp()
    # not strict without them: load_state_dict would call the left-out frozen weights missing
    options = sd.StateDictOptions(ignore_frozen_params=not frozen, strict=frozen)
    model_state, optim_state = sd.get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optim_state}, options


def save(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer, frozen: bool = True) -> None:
    """Collective: every rank writes its shard of model and optimizer into `directory`."""
    dcp, _ = _dcp()
    state, _ = _states(model, optimizer, frozen)
    dcp.save(state, checkpoint_id=str(directory))


def load(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer, frozen: bool = True) -> None:
    """Collective: fill this rank's shards of model and optimizer, whatever world size wrote them."""
    dcp, sd = _dcp()
    state, options = _states(model, optimizer, frozen)
    try:
        dcp.load(state, checkpoint_id=str(directory))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        raise LlmkitError(f"cannot resume from sharded checkpoint {directory}: {str(e).splitlines()[0]}") from None
    sd.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                      options=options)


def gather_trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the trainable parameters whole, on the CPU of rank 0 (empty elsewhere)."""
    _, sd = _dcp()
    options = sd.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return sd.get_model_state_dict(model, options=options)


def load_weights(directory, model: torch.nn.Module) -> None:
    """Fill a plain (unsharded) model from a sharded checkpoint, in this process alone."""
    dcp, _ = _dcp()
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise LlmkitError(f"missing sharded weights in {directory} (no .metadata)")
    state = {k: v for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # aliases embed.weight: loaded through it
    with warnings.catch_warnings():  # "no process group: loading in one process" is the point here
        warnings.simplefilter("ignore")
        try:
            dcp.load({"model": state}, checkpoint_id=str(directory), no_dist=True)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise LlmkitError(f"{directory} does not match the model config: {str(e).splitlines()[0]}") from None
    model.load_state_dict(state, strict=False)


def weight_names(directory) -> set[str]:
    """Model tensor names recorded in a sharded checkpoint's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {k.removeprefix("model.") for k in keys if k.startswith("model.")}
