"""Building blocks of the decoder: norms, position encodings, attention with a KV cache, MLPs.

Shapes: B batch, T new tokens in this call, S keys visible (cache + new), H query heads,
K key/value heads (K divides H: grouped-query attention), D head_dim, C n_embd.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.model.cache import LayerCache


class RMSNorm(nn.Module):
    """Root-mean-square norm with the numerics of HF Llama: statistics in fp32, weight applied after casting back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class FixedPositionTable(nn.Module):
    """A fixed function of the position, tabulated up to some length and regrown on demand.

    Subclasses define `names` (the tables) and `compute(n, device)` (fp32 values for 0..n-1).
    Tables are non-persistent buffers: they follow .to(device/dtype) but never reach a checkpoint.
    """

    names: tuple[str, ...] = ()

    def __init__(self, max_len: int):
        super().__init__()
        for name, table in zip(self.names, self.compute(max_len, None)):
            self.register_buffer(name, table, persistent=False)

    def compute(self, n: int, device) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _grow(self, n: int) -> None:
        old = getattr(self, self.names[0])
        # compute in fp32 and round once to the model dtype, as the initial tables were
        for name, table in zip(self.names, self.compute(max(n, 2 * old.shape[0]), old.device)):
            setattr(self, name, table.to(old.dtype))

    def forward(self, T: int, start: int = 0, positions: torch.Tensor | None = None):
        """Rows for positions start..start+T-1 as (T, dim), or for explicit (B, T) positions as (B, T, dim)."""
        length = getattr(self, self.names[0]).shape[0]
        if positions is None:
            if start + T > length:
                self._grow(start + T)
            return tuple(getattr(self, name)[start:start + T] for name in self.names)
        needed = int(positions.max()) + 1
        if needed > length:
            self._grow(needed)
        return tuple(getattr(self, name)[positions] for name in self.names)


class SinusoidalPositions(FixedPositionTable):
    """Vaswani et al. (2017): PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same angle)."""

    names = ("table",)

    def __init__(self, dim: int, max_len: int):
        self.dim = dim
        super().__init__(max_len)

    def compute(self, n, device):
        half = (self.dim + 1) // 2
        inv_freq = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * (-2 * math.log(10000.0) / self.dim))
        angles = torch.arange(n, dtype=torch.float32, device=device)[:, None] * inv_freq
        # interleave sin and cos along the feature axis, dropping the last column for odd dims
        table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, :self.dim]
        return (table,)


class RotaryEmbedding(FixedPositionTable):
    """cos/sin tables for RoPE in the HF Llama layout: frequencies repeated over the two halves of D."""

    names = ("cos", "sin")

    def __init__(self, head_dim: int, theta: float, max_len: int):
        self.head_dim, self.theta = head_dim, theta
        super().__init__(max_len)

    def compute(self, n, device):
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys; cos/sin are (T, D) or (B, 1, T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # HF's rotate_half
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with one fused q/k/v projection."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        # rows of the fused weight: all q heads, then k heads, then v heads (the fixed interop layout)
        self.qkv = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim,
                          bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x, rope=None, cache: LayerCache | None = None, mask=None, causal: bool = True):
        """x (B, T, C). `mask` is a bool (T, S) or (B, 1, T, S) tensor, True = may attend; with
        mask None, `causal` selects plain causal attention (T == S) or attention to every key."""
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        # (B, T, heads, D) -> (B, heads, T, D): strided views, SDPA reads them without a copy
        qk, v = self.qkv(x).view(B, T, H + 2 * K, D).transpose(1, 2).split((H + K, K), dim=1)
        if rope is not None:
            cos, sin = rope
            if cos.dim() == 3:  # per-row positions: (B, T, D) -> (B, 1, T, D), broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            qk = apply_rotary(qk, cos, sin)  # queries and keys rotate alike: one pass for both
        q, k = qk.split((H, K), dim=1)
        if cache is not None:
            k, v = cache.update(k, v)
            q = q.to(k.dtype)  # a float32 cache beside bf16 weights (CPU): attention runs in float32
        y = self.attend(q, k, v, mask, causal, cache)
        y = self.proj(y.transpose(1, 2).reshape(B, T, H * D).to(x.dtype))
        return self.resid_drop(y) if self.resid_drop is not None else y

    def attend(self, q, k, v, mask, causal: bool, cache=None) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over (B, H, T, D) queries and (B, K, S, D) keys/values
        (`cache`, which holds them, is for subclasses that attend differently)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and causal,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.n_head != self.n_kv_head)


class GeluMLP(nn.Module):
    """GPT-2 feed-forward: fc -> gelu -> proj. GPT-2 uses the tanh approximation, nanoGPT the exact
    erf form (which is also several times faster on CPU: the tanh form is not vectorised there)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.approximate = "none" if config.mlp == "gelu_erf" else "tanh"

    def forward(self, x):
        y = self.proj(F.gelu(self.fc(x), approximate=self.approximate))
        return self.drop(y) if self.drop is not None else y


class SwiGLU(nn.Module):
    """Llama feed-forward: one fused gate/up projection (gate rows first), silu(gate) * up -> proj."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(config.n_embd, 2 * config.intermediate_size, bias=config.bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        y = self.proj(F.silu(gate) * up)
        return self.drop(y) if self.drop is not None else y


def make_mlp(config: ModelConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)
