"""Interoperability with other checkpoint formats (Hugging Face directories, GGUF files).

Both importers end in the same two helpers: `fuse_llama_layer` puts separate q/k/v and
gate/up projections into llmkit's fused rows, `build_model` checks every tensor against the
config before loading, so a mismatch names the file and the tensor instead of failing deep in torch.
"""
from __future__ import annotations

import torch

from llmkit.model.config import ModelConfig
from llmkit.utils import check_state


def fuse_llama_layer(i: int, *, norm1, norm2, q, k, v, o, gate, up, down,
                     q_bias=None, k_bias=None, v_bias=None) -> dict[str, torch.Tensor]:
    """One Llama block's tensors under llmkit names (qkv rows: q, k, v; gate_up rows: gate, up)."""
    p = f"blocks.{i}."
    out = {
        p + "attn_norm.weight": norm1,
        p + "attn.qkv.weight": torch.cat([q, k, v], dim=0),
        p + "attn.proj.weight": o,
        p + "mlp_norm.weight": norm2,
        p + "mlp.gate_up.weight": torch.cat([gate, up], dim=0),
        p + "mlp.proj.weight": down,
    }
    if q_bias is not None:
        out[p + "attn.qkv.bias"] = torch.cat([q_bias, k_bias, v_bias], dim=0)
    return out


def split_llama_layer(state: dict, i: int, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `fuse_llama_layer`: separate q/k/v and gate/up again."""
    p = f"blocks.{i}."
    q_rows, kv_rows = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    sizes = [q_rows, kv_rows, kv_rows]
    q, k, v = state[p + "attn.qkv.weight"].split(sizes, dim=0)
    gate, up = state[p + "mlp.gate_up.weight"].chunk(2, dim=0)
    out = dict(norm1=state[p + "attn_norm.weight"], norm2=state[p + "mlp_norm.weight"], q=q, k=k, v=v,
               o=state[p + "attn.proj.weight"], gate=gate, up=up, down=state[p + "mlp.proj.weight"])
    if p + "attn.qkv.bias" in state:
        out["q_bias"], out["k_bias"], out["v_bias"] = state[p + "attn.qkv.bias"].split(sizes, dim=0)
    return out


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], source) -> torch.nn.Module:
    """A GPT with `state` loaded, after checking names and shapes; errors name `source`."""
    from llmkit.model.decoder import GPT

    model = GPT(config)
    if config.tie_embeddings and "lm_head.weight" not in state and "embed.weight" in state:
        state = {**state, "lm_head.weight": state["embed.weight"]}
    check_state(state, model.state_dict(), source)
    model.load_state_dict(state, strict=True)
    return model.eval()
