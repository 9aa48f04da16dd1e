"""The decoder-only Transformer: GPT-2, Llama and original-Transformer variants from one ModelConfig.

forward(idx, targets=None, *, cache=None, positions=None, attn_mask=None) -> (logits, loss)
  idx        (B, T) int64 token ids.
  targets    (B, T) int64, -100 = ignored; loss is the mean cross-entropy over the rest.
  cache      KVCache from new_cache(): keys/values of this call go to slots cache.pos..cache.pos+T-1,
             attention covers slots 0..cache.pos+T-1, then cache.pos += T.
  positions  (B, T) absolute positions (left-padded batches); default cache.pos + arange(T).
  attn_mask  (B, S) bool over the S = cache.pos + T keys, True = real token that may be attended.
Attention is causal by slot: the query in slot s sees keys in slots <= s that attn_mask allows
(a padding query also sees its own slot, so no row of the softmax is empty).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model.layers import (CausalSelfAttention, KVCache, Linear, RotaryEmbedding, SinusoidalPositions,
                                 half_matmuls_in_float32, make_mlp, make_norm)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
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
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
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

    def forward(self, idx, targets=None, *, cache: KVCache | None = None, positions=None, attn_mask=None,
                last_only: bool = False):
        """See the module docstring. `last_only` computes logits for the last position only ((B, 1, V)),
        which is all a generation step needs."""
        cfg = self.config
        B, T = idx.shape
        start = 0
        if cache is not None:
            start = cache.pos
            if start + T > cache.max_len:
                raise LlmkitError(f"{start + T} tokens exceed the KV cache capacity of {cache.max_len}")
        x = self.embed(idx)
        if self.pos_embed is not None:
            if positions is None:
                if start + T > cfg.block_size:
                    raise LlmkitError(f"sequence of {start + T} tokens exceeds block_size={cfg.block_size}")
                x = x + self.pos_embed.weight[start:start + T]
            else:
                if int(positions.max()) >= cfg.block_size:
                    raise LlmkitError(f"position {int(positions.max())} exceeds block_size={cfg.block_size}")
                x = x + self.pos_embed(positions)
        elif self.sinusoid is not None:
            (table,) = self.sinusoid(T, start, positions)
            x = x * self.embed_scale + table.to(x.dtype)
        rope = self.rope(T, start, positions) if self.rope is not None else None
        if self.drop is not None:
            x = self.drop(x)
        mask, causal = self._attention_mask(T, start, attn_mask, idx.device)
        with half_matmuls_in_float32(self.embed.weight, B * T):
            for block in self.blocks:
                x = block(x, rope, cache, mask, causal)
            if cache is not None:
                cache.advance(T)
            if last_only:
                x = x[:, -1:]
            logits = self.lm_head(self.final_norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @staticmethod
    def _attention_mask(T: int, start: int, attn_mask, device):
        """(mask, causal) for SDPA. The common cases need no mask tensor: plain causal attention when
        nothing is cached, attention to every key for a single new token. Otherwise a bool mask that
        is causal by slot (query i sits in slot start+i) and-ed with the padding mask."""
        if attn_mask is None:
            if start == 0:
                return None, True
            if T == 1:
                return None, False
        S = start + T
        if attn_mask is not None and tuple(attn_mask.shape[1:]) != (S,):
            raise LlmkitError(f"attn_mask covers {attn_mask.shape[-1]} keys, expected {S} (cached + new)")
        keys, slots = torch.arange(S, device=device), torch.arange(start, S, device=device)[:, None]
        mask = keys <= slots  # (T, S)
        if attn_mask is not None:
            # A padding query may always see its own slot: a row with no visible key would be NaN on
            # some SDPA backends, and a NaN value poisons real rows even at attention weight 0.
            mask = mask & (attn_mask.bool()[:, None, None, :] | (keys == slots))  # (B, 1, T, S)
        return mask, False

    def kv_dtype(self, device=None) -> torch.dtype:
        """The dtype keys/values are cached in: the weights' dtype, except on CPU, where it is float32.
        CPU attention in bf16/fp16 is several times slower (0.4 ms instead of 0.15 per SmolLM2 layer
        at 600 keys), and the cache is small next to the weights."""
        weight = self.embed.weight
        return torch.float32 if torch.device(device or weight.device).type == "cpu" else weight.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """A preallocated KV cache for `batch_size` rows and `max_len` slots (default block_size)."""
        cfg = self.config
        device = device or self.embed.weight.device
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       device=device, dtype=dtype or self.kv_dtype(device))

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
