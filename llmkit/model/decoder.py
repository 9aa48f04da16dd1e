"""The decoder-only Transformer: GPT-2, Llama and original-Transformer variants from one ModelConfig.

forward(idx, targets=None, *, cache=None, lengths=None, attn_mask=None, last_only=False) -> (logits, loss)
  idx        (B, T) int64 token ids.
  targets    (B, T) int64, -100 = ignored; loss is the mean cross-entropy over the rest.
  cache      KVCache (model/cache.py) from new_cache(): rows 0..B-1 each continue from their own
             length; this call's tokens are written after it and attend causally by slot.
  lengths    (B,) ints: how many of each row's T tokens are real (right padding); the cache keeps
             those, and last_only takes each row's last real token. Default: all T.
  attn_mask  (B, T) bool key mask without a cache, True = real token (padded training batches).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model.cache import KVCache
from llmkit.model.layers import CausalSelfAttention, RotaryEmbedding, SinusoidalPositions, make_mlp, make_norm


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x, rope=None, cache=None, mask=None, causal=True):
        x = x + self.attn(self.attn_norm(x), rope, cache, mask, causal)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    arch = "decoder"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_embed = self.sinusoid = self.rope = None
        if config.pos == "learned":
            self.pos_embed = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":
            self.sinusoid = SinusoidalPositions(config.n_embd, config.block_size)
            # Vaswani et al. scale token embeddings by sqrt(C) so they are not drowned by the +-1 table
            self.embed_scale = math.sqrt(config.n_embd)
        else:
            self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.block_size)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.cache_dtype = None  # dtype of cached keys/values; None: the weights'
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual projections shrunk by 1/sqrt(2 n_layer)
        so the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, idx, targets=None, *, cache: KVCache | None = None, lengths: list[int] | None = None,
                attn_mask=None, last_only: bool = False):
        """See the module docstring. `last_only` computes logits for one position per row ((B, 1, V)),
        which is all a generation step needs."""
        B, T = idx.shape
        start, positions, mask, causal = 0, None, None, True
        if cache is not None:
            step = cache.begin(B, T)
            start, positions, mask, causal = step.start, step.positions, step.mask, step.causal
        elif attn_mask is not None:
            mask, causal = self._padding_mask(attn_mask), False
        x = self.embed(idx)
        if self.pos_embed is not None:
            last = start + T - 1 if positions is None else int(positions.max())
            if last >= self.config.block_size:
                raise LlmkitError(f"position {last} exceeds block_size={self.config.block_size}")
            x = x + (self.pos_embed.weight[start:start + T] if positions is None else self.pos_embed(positions))
        elif self.sinusoid is not None:
            (table,) = self.sinusoid(T, start, positions)
            x = x * self.embed_scale + table.to(x.dtype)
        rope = self.rope(T, start, positions) if self.rope is not None else None
        if self.drop is not None:
            x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None if cache is None else cache.layer(i), mask, causal)
        if cache is not None:
            cache.advance(T if lengths is None else list(lengths))
        if last_only and lengths is not None:  # each row's last real token
            x = x[torch.arange(B, device=x.device), torch.as_tensor(lengths, device=x.device) - 1][:, None]
        elif last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.final_norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @staticmethod
    def _padding_mask(attn_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, T, T) bool: causal, and-ed with the key mask. A padding query may always see its own
        slot: a row with no visible key would be NaN on some SDPA backends, and a NaN value poisons
        real rows even at attention weight 0."""
        T = attn_mask.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=attn_mask.device).tril()
        return causal & (attn_mask.bool()[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=attn_mask.device))

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None,
                  static: bool = False) -> KVCache:
        """A preallocated KV cache for `batch_size` rows and `max_len` slots (default block_size)."""
        cfg = self.config
        device = device or self.embed.weight.device
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       device=device, dtype=dtype or self.cache_dtype or self.embed.weight.dtype, static=static)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (a tied embedding counted once). non_embedding drops the lookup tables that
        cost no FLOPs (position embeddings, and the input embedding when lm_head is separate), as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_embed is not None:
                n -= self.pos_embed.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training (forward + backward) FLOPs per token: 6N for the matmuls with the weights plus
        12 * n_layer * n_head * head_dim * T for attention scores and weighted values (PaLM, appendix B)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T
