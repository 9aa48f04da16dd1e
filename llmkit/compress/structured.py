"""Structured pruning: remove whole layers, attention heads (whole KV groups under GQA) and MLP channels,
giving a smaller dense model that the plain ModelConfig still describes.

Sizes stay uniform across layers (every layer keeps the same number of heads and channels), so the
result loads, trains, generates and exports like any other llmkit model. What is removed is ranked
by calibration (llmkit.compress.calibrate): a layer by how much the loss rises without it, a KV group
by its heads' contribution to the residual stream, an MLP channel likewise (Minitron-style importance).
Kept weights are copied unchanged; only the rows/columns of removed units disappear.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.model.config import ModelConfig


@dataclass
class Sizes:
    """What each dimension keeps: layers, query heads per layer, MLP channels per layer."""
    layers: int
    heads: int
    mlp: int


def pruned_config(config: ModelConfig, sizes: Sizes) -> ModelConfig:
    group = config.n_head // config.n_kv_head
    return dataclasses.replace(config, n_layer=sizes.layers, n_head=sizes.heads, n_kv_head=sizes.heads // group,
                               head_dim=config.head_dim, intermediate_size=sizes.mlp)


def count_params(config: ModelConfig) -> int:
    """Parameters of a model with this config (a tied embedding counted once), without allocating it."""
    from llmkit.model.decoder import GPT

    with torch.device("meta"):
        return GPT(config).num_params(non_embedding=False)


def check_sizes(config: ModelConfig, sizes: Sizes) -> None:
    """Each target within the model, and no layer left without heads; one clear line otherwise."""
    group = config.n_head // config.n_kv_head
    if sizes.heads < 1:
        raise LlmkitError(f"--heads {sizes.heads} would prune every attention head of a layer; keep at least "
                          f"{group} (one KV group)")
    for what, value, limit in (("--layers", sizes.layers, config.n_layer), ("--heads", sizes.heads, config.n_head),
                               ("--mlp", sizes.mlp, config.intermediate_size)):
        if value > limit:
            raise LlmkitError(f"{what} {value} is larger than the model ({limit}); pruning only removes")
        if value < 1:
            raise LlmkitError(f"{what} must keep at least 1, got {value}")
    if sizes.heads % group:
        raise LlmkitError(f"--heads {sizes.heads} must be a multiple of {group}: each of the {config.n_kv_head} "
                          f"KV groups serves {group} query heads, and only whole groups can go")


def solve_mlp(config: ModelConfig, layers: int, heads: int, target: int) -> int:
    """The widest MLP (in steps of 64 for wide MLPs, so kernels keep aligned rows) that fits `target` params."""
    step = 64 if config.intermediate_size >= 512 else 1
    best = None
    for mlp in range(step, config.intermediate_size + 1, step):
        if count_params(pruned_config(config, Sizes(layers, heads, mlp))) > target:
            break
        best = mlp
    if best is None:
        raise LlmkitError(f"cannot reach {target:,} parameters with {layers} layers and {heads} heads by "
                          "narrowing the MLP alone; also lower --layers or --heads")
    return best


def plan_sizes(config: ModelConfig, params: int | None = None, layers: int | None = None,
               heads: int | None = None, mlp: int | None = None) -> Sizes:
    """Explicit sizes, with whatever is not given kept; with a --params target the MLP width is solved for."""
    total = count_params(config)
    if params is not None:
        if params >= total:
            raise LlmkitError(f"--params {params:,} is not smaller than the model ({total:,} parameters)")
        if params < 1:
            raise LlmkitError(f"--params must be positive, got {params}")
        if mlp is not None:
            raise LlmkitError("--params solves for the MLP width: give --params or --mlp, not both")
    sizes = Sizes(config.n_layer if layers is None else layers, config.n_head if heads is None else heads,
                  config.intermediate_size if mlp is None else mlp)
    check_sizes(config, sizes)
    if params is not None:
        sizes.mlp = solve_mlp(config, sizes.layers, sizes.heads, params)
    if sizes == Sizes(config.n_layer, config.n_head, config.intermediate_size):
        raise LlmkitError("nothing to prune: give --params, or --layers/--heads/--mlp smaller than the model")
    return sizes


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (so the kept units keep their layout)."""
    return scores.topk(k).indices.sort().values


def _slice_block(state: dict, p: str, config: ModelConfig, groups: torch.Tensor, channels: torch.Tensor) -> dict:
    """One block's tensors with only the kept KV groups (their query heads with them) and MLP channels."""
    G, D, H, K = config.n_head // config.n_kv_head, config.head_dim, config.n_head, config.n_kv_head
    heads = (groups[:, None] * G + torch.arange(G)).flatten()             # query heads of the kept groups

    def rows(units, size, offset=0):
        return (offset + units[:, None] * size + torch.arange(size)).flatten()

    qkv_rows = torch.cat([rows(heads, D), rows(groups, D, H * D), rows(groups, D, (H + K) * D)])
    out = {}
    for name, tensor in state.items():
        if not name.startswith(p):
            continue
        local = name[len(p):]
        if local.startswith("attn.qkv."):
            tensor = tensor[qkv_rows]
        elif local == "attn.proj.weight":
            tensor = tensor[:, rows(heads, D)]
        elif local.startswith("mlp.gate_up."):
            gate, up = tensor.chunk(2, dim=0)
            tensor = torch.cat([gate[channels], up[channels]])
        elif local.startswith("mlp.fc."):
            tensor = tensor[channels]
        elif local == "mlp.proj.weight":
            tensor = tensor[:, channels]
        out[local] = tensor
    return out


@torch.no_grad()
def prune_structured(model, sizes: Sizes, stats, layer_losses: torch.Tensor | None = None):
    """A new, smaller GPT: the `sizes.layers` layers whose removal hurts most, in each the most
    important KV groups and MLP channels. `stats` is an ActivationStats of this model; `layer_losses`
    the per-layer loss without that layer (needed only when layers are removed)."""
    from llmkit.model.decoder import GPT

    config = model.config
    check_sizes(config, sizes)
    if sizes.layers < config.n_layer and layer_losses is None:
        raise LlmkitError("removing layers needs the per-layer removal losses from calibration")
    kept_layers = _top(layer_losses, sizes.layers) if sizes.layers < config.n_layer else torch.arange(config.n_layer)
    new_config = pruned_config(config, sizes)
    state = model.state_dict()
    new_state = {k: v for k, v in state.items() if not k.startswith("blocks.")}
    for new_i, old_i in enumerate(kept_layers.tolist()):
        groups = _top(stats.group_importance(model, old_i), new_config.n_kv_head)
        channels = _top(stats.channel_importance(model, old_i), sizes.mlp)
        block = _slice_block(state, f"blocks.{old_i}.", config, groups, channels)
        new_state.update({f"blocks.{new_i}.{k}": v.clone() for k, v in block.items()})
    pruned = GPT(new_config)
    pruned.load_state_dict(new_state, strict=True)
    return pruned.to(next(model.parameters()).dtype).eval()
