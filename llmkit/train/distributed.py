"""Multi-process training helpers for `torchrun` launches: DDP and FSDP2.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK for every process; without them
we are a single process and every helper here degrades to a no-op (except that
FSDP, which always needs a process group, gets a one-process one).

strategy=ddp   every rank holds the whole model; gradients are all-reduced in backward.
strategy=fsdp  PyTorch's FSDP2 (`fully_shard`) per unit of blocks and at the root: each rank keeps
               1/world of the parameters, gradients and optimizer moments; parameters are
               all-gathered unit by unit for compute, gradients reduce-scattered.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect() -> DistInfo:
    """Read torchrun's environment; a plain `python` launch gives rank 0 of 1."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))


def init(info: DistInfo, device: torch.device, always: bool = False) -> bool:
    """Join the process group: NCCL between GPUs, gloo between CPU processes. `always` makes a
    one-process group when not under torchrun. True when this call created the group."""
    if not (info.enabled or always) or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled:
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    else:  # no torchrun: an in-memory store, no port to pick
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP: every rank holds the full model; gradients are averaged during backward."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated units FSDP shards one by one and activation checkpointing recomputes: decoders'
    and encoders' `.blocks`; a seq2seq model's encoder layers and, per decoder layer, its self-attention
    and feed-forward. Its cross-attention projects the encoder output outside the layer's forward
    (`Seq2Seq.new_cache`), where a per-layer unit would still be sharded, so it stays with the root."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    if hasattr(model, "encoder") and hasattr(model, "decoder"):
        return [*model.encoder, *(part for layer in model.decoder for part in (layer.self_attn, layer.mlp))]
    return []


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (less memory, ~1/3
    more compute). Replaces the instance's forward, so parameter names stay unchanged."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks(model):
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


MMAP_THRESHOLD = 4 << 20  # bytes; glibc's own starts at 128 KiB and rises with every larger free, up to 32 MiB


def return_freed_buffers_to_os(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc give large freed buffers back to the OS. FSDP allocates and frees each block's
    gathered parameters and full gradients every step; glibc raises its mmap threshold after the first
    such free and from then on keeps them in the heap, freed but resident and fragmented: 1.2 GB
    resident for 0.4 GB of live tensors on benchmarks/fsdp_speed.py's `deep` row (as much as DDP).
    A fixed threshold puts every buffer above it in its own mapping, unmapped when freed; the price
    is zero-filling fresh pages each step. A no-op off glibc, or when MALLOC_MMAP_THRESHOLD_ is set."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: no mallopt
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, threshold))


def units(modules: list[torch.nn.Module], min_bytes: float) -> list[list[torch.nn.Module]]:
    """Consecutive modules grouped until each group holds at least `min_bytes` of parameters (the
    last group may hold less); min_bytes=0 gives one group per module."""
    groups: list[list[torch.nn.Module]] = []
    size = min_bytes
    for module in modules:
        if size >= min_bytes:  # the previous group is full: start the next one
            groups.append([])
            size = 0
        groups[-1].append(module)
        size += sum(p.numel() * p.element_size() for p in module.parameters())
    return groups


def shard(model: torch.nn.Module, param_dtype: torch.dtype | None = None, unit_mb: float = 0.0) -> None:
    """FSDP2 in place: consecutive blocks grouped into units of at least `unit_mb` MB, each gathered just
    for its compute, plus the root for the rest. `param_dtype` (bf16) casts parameters for compute;
    gradients are reduced in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    groups = units(blocks(model), unit_mb * 2**20)
    for i, group in enumerate(groups):
        # The last unit's backward starts right after the loss: resharding it after forward would only
        # gather it again at once. Every unit's all-gather and reduce-scatter blocks the compute on gloo,
        # so fewer, larger units save most of FSDP's extra step time on small models.
        fully_shard(group if len(group) > 1 else group[0], mp_policy=policy,
                    reshard_after_forward=i < len(groups) - 1)
    # The root (embeddings, head, final norm) is gathered first in backward anyway: keeping it gathered
    # after forward saves one all-gather per step for the memory of one unit.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Context for one micro-step: with enabled=False gradients only accumulate locally (no
    all-reduce / reduce-scatter); the last micro-step of an optimizer step syncs them once."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if enabled or not hasattr(model, "no_sync"):  # one process, or DDP's syncing step
        return contextlib.nullcontext()
    return model.no_sync()
