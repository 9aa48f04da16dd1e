"""The encoder-decoder Transformer (Vaswani et al., 2017), and the variants real checkpoints use.

One Seq2SeqConfig covers the paper's model (post-norm, ReLU, sinusoidal positions), Marian (the
same with SiLU and sinusoids in two halves), BART (learned positions offset by 2, a norm after the
embeddings, GELU) and T5 (pre-norm RMSNorm, no biases, unscaled attention with a relative position
bias in each stack's first layer). Embeddings are shared by encoder, decoder and output projection.

  forward(src, tgt, targets=None, src_mask=None) -> (logits, loss)   teacher forcing
  encode(src, src_mask) -> memory (B, S, C)
  new_cache(memory, src_mask, max_len) -> Seq2SeqCache  (cross-attention keys/values computed once)
  decode(tgt, cache, last_only=False) -> logits           incremental decoding with the cache
src_mask: (B, S) bool, True = real token (default: src != pad_id).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.model.layers import RMSNorm, SinusoidalPositions

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


@dataclass
class Seq2SeqConfig:
    vocab_size: int = 8000
    block_size: int = 256            # longest source, and longest target, in tokens
    n_layer: int = 6                 # encoder layers
    n_dec_layer: int | None = None   # decoder layers; None: n_layer
    n_head: int = 8
    n_embd: int = 512
    head_dim: int | None = None      # None: n_embd // n_head
    intermediate_size: int = 2048
    dropout: float = 0.1
    bias: bool = True
    norm: str = "layernorm"          # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    prenorm: bool = False            # False: the paper's x = norm(x + f(x)); True: x + f(norm(x))
    final_norm: bool = False         # a norm closing each stack (pre-norm models)
    embed_norm: bool = False         # a norm right after the embeddings (BART)
    activation: str = "relu"         # relu | gelu | gelu_new | silu
    gated: bool = False              # act(W0 x) * (W1 x) feed-forward (T5 v1.1)
    pos: str = "sinusoidal"          # "sinusoidal" | "learned" | "relative"
    sinusoid_halves: bool = False    # sin in the first half, cos in the second (Marian) instead of interleaved
    pos_offset: int = 0              # learned positions start at this row (BART: 2)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_embedding: bool = True     # token embeddings times sqrt(n_embd)
    scale_attention: bool = True     # scores / sqrt(head_dim); T5 folds this into its weights
    tie_embeddings: bool = True      # output projection = the shared embedding
    logits_bias: bool = False        # a fixed bias on the logits (BART/Marian final_logits_bias)
    scale_logits: bool = False       # decoder output times n_embd ** -0.5 before a tied projection (T5)
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_id: int = 0
    init_std: float = 0.02

    def __post_init__(self):
        self.n_dec_layer = self.n_layer if self.n_dec_layer is None else self.n_dec_layer
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LlmkitError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r} (layernorm, rmsnorm)"),
            (self.activation in ACTIVATIONS, f"unknown activation {self.activation!r} ({', '.join(ACTIVATIONS)})"),
            (self.pos in ("sinusoidal", "learned", "relative"), f"unknown pos {self.pos!r} (sinusoidal, learned, relative)"),
            (min(self.vocab_size, self.block_size, self.n_layer, self.n_dec_layer, self.n_head, self.n_embd) > 0,
             "sizes must be positive"),
            (all(0 <= i < self.vocab_size for i in (self.pad_id, self.eos_id, self.decoder_start_id)),
             f"pad_id, eos_id and decoder_start_id must be token ids below vocab_size={self.vocab_size}"),
        ]
        failed = [message for ok, message in checks if not ok]
        if failed:
            raise LlmkitError(failed[0])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if not names.issuperset(d):
            raise LlmkitError(f"unknown seq2seq config keys: {', '.join(sorted(set(d) - names))}")
        return cls(**d)


SEQ2SEQ_PRESETS: dict[str, dict] = {
    # Vaswani et al. (2017), the base model: 6+6 layers, d_model 512, 8 heads, FFN 2048, dropout 0.1
    "transformer-base": dict(vocab_size=37000, block_size=256, n_layer=6, n_head=8, n_embd=512, intermediate_size=2048),
    "seq2seq-tiny": dict(vocab_size=4096, block_size=128, n_layer=2, n_head=4, n_embd=128, intermediate_size=512,
                         dropout=0.1),
}


def seq2seq_preset(name: str, **overrides) -> Seq2SeqConfig:
    if name not in SEQ2SEQ_PRESETS:
        raise LlmkitError(f"unknown seq2seq preset {name!r}; choose from {', '.join(SEQ2SEQ_PRESETS)}")
    return Seq2SeqConfig(**{**SEQ2SEQ_PRESETS[name], **overrides})


def _norm(cfg: Seq2SeqConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)


def relative_buckets(query_pos, key_pos, bidirectional: bool, n_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bucket of each (query, key) offset: exact for small offsets, logarithmic up to max_distance,
    one shared bucket beyond; a bidirectional stack gives keys after the query their own half."""
    offset = key_pos[None, :] - query_pos[:, None]
    bucket = torch.zeros_like(offset)
    if bidirectional:
        n_buckets //= 2
        bucket = (offset > 0).long() * n_buckets
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)
    exact = n_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections; keys/values from `memory` (cross-attention)
    or from x (self-attention, optionally through a SelfAttentionCache). `bias` is added to the scores."""

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int = 0):
        super().__init__()
        self.n_head, self.head_dim, self.layer_idx = cfg.n_head, cfg.head_dim, layer_idx
        inner = cfg.n_head * cfg.head_dim
        self.q, self.k, self.v = (nn.Linear(cfg.n_embd, inner, bias=cfg.bias) for _ in range(3))
        self.o = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)
        self.scale = cfg.head_dim ** -0.5 if cfg.scale_attention else 1.0
        self.dropout = cfg.dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_head, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.k(memory)), self.heads(self.v(memory))

    def forward(self, x, bias=None, kv=None, cache: SelfAttentionCache | None = None, causal: bool = False):
        B, T, _ = x.shape
        q = self.heads(self.q(x))
        k, v = kv if kv is not None else self.project_kv(x)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal and bias is None,
                                           dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias)
        self.gate = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=cfg.bias) if cfg.gated else None
        self.proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = self.act(self.fc(x))
        if self.gate is not None:
            h = h * self.gate(x)
        return self.proj(self.drop(h))


class Layer(nn.Module):
    """Self-attention, cross-attention (decoder only), feed-forward; each a residual sub-layer."""

    def __init__(self, cfg: Seq2SeqConfig, layer_idx: int, cross: bool):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.self_attn, self.self_norm = Attention(cfg, layer_idx), _norm(cfg)
        self.cross_attn = Attention(cfg, layer_idx) if cross else None
        self.cross_norm = _norm(cfg) if cross else None
        self.mlp, self.mlp_norm = FeedForward(cfg), _norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def _residual(self, x, norm, f):
        if self.prenorm:
            return x + self.drop(f(norm(x)))
        return norm(x + self.drop(f(x)))

    def forward(self, x, self_bias=None, cache=None, causal=False, cross_kv=None, cross_bias=None):
        x = self._residual(x, self.self_norm, lambda h: self.self_attn(h, self_bias, cache=cache, causal=causal))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, cross_bias, kv=cross_kv))
        return self._residual(x, self.mlp_norm, self.mlp)


class SelfAttentionCache:
    """The decoder's self-attention keys/values, (B, H, max_len, D) per layer, rows in lockstep: every
    row of a seq2seq decode starts from the same start token, so one write position serves all."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int, device, dtype):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len, self.pos = max_len, 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def reorder(self, index: torch.Tensor) -> None:
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]


class Seq2SeqCache:
    """What decoding one batch of sources needs: the decoder's self-attention KV cache, each layer's
    cross-attention keys/values (computed once per source) and the source padding bias."""

    def __init__(self, self_kv: SelfAttentionCache | None, cross_kv: list, cross_bias: torch.Tensor):
        self.self_kv, self.cross_kv, self.cross_bias = self_kv, cross_kv, cross_bias

    @property
    def pos(self) -> int:
        return self.self_kv.pos if self.self_kv is not None else 0

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (beam search), for every part of the cache."""
        self.self_kv.reorder(index)
        self.cross_kv = [(k[index], v[index]) for k, v in self.cross_kv]
        self.cross_bias = self.cross_bias[index]


class Seq2Seq(nn.Module):
    arch = "seq2seq"

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        cfg = self.config = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.embed_scale = math.sqrt(cfg.n_embd) if cfg.scale_embedding else 1.0
        self.pos_embed = self.sinusoid = None
        self.enc_rel = self.dec_rel = None
        if cfg.pos == "learned":
            self.enc_pos = nn.Embedding(cfg.block_size + cfg.pos_offset, cfg.n_embd)
            self.dec_pos = nn.Embedding(cfg.block_size + cfg.pos_offset, cfg.n_embd)
        elif cfg.pos == "sinusoidal":
            self.sinusoid = SinusoidalPositions(cfg.n_embd, cfg.block_size)
        else:
            self.enc_rel = nn.Embedding(cfg.relative_buckets, cfg.n_head)
            self.dec_rel = nn.Embedding(cfg.relative_buckets, cfg.n_head)
        self.enc_embed_norm = _norm(cfg) if cfg.embed_norm else None
        self.dec_embed_norm = _norm(cfg) if cfg.embed_norm else None
        self.encoder = nn.ModuleList(Layer(cfg, i, cross=False) for i in range(cfg.n_layer))
        self.decoder = nn.ModuleList(Layer(cfg, i, cross=True) for i in range(cfg.n_dec_layer))
        self.enc_norm = _norm(cfg) if cfg.final_norm else None
        self.dec_norm = _norm(cfg) if cfg.final_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("final_logits_bias", torch.zeros(cfg.vocab_size), persistent=cfg.logits_bias)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---- embeddings and position information ---------------------------------------------------

    def _embed(self, ids: torch.Tensor, start: int, decoder: bool) -> torch.Tensor:
        cfg = self.config
        T = ids.shape[1]
        if cfg.pos != "relative" and start + T > cfg.block_size:
            side = "target" if decoder else "source"
            raise LlmkitError(f"{side} of {start + T} tokens exceeds block_size={cfg.block_size}")
        x = self.embed(ids) * self.embed_scale
        if cfg.pos == "learned":
            table = self.dec_pos if decoder else self.enc_pos
            x = x + table.weight[cfg.pos_offset + start:cfg.pos_offset + start + T]
        elif cfg.pos == "sinusoidal":
            (table,) = self.sinusoid(T, start)
            if cfg.sinusoid_halves:  # (T, C) interleaved sin/cos -> all sines, then all cosines
                table = table.view(T, -1, 2).transpose(1, 2).reshape(T, -1)
            x = x + table.to(x.dtype)
        norm = self.dec_embed_norm if decoder else self.enc_embed_norm
        return self.drop(norm(x) if norm is not None else x)

    def _relative_bias(self, T: int, S: int, start: int, decoder: bool) -> torch.Tensor | None:
        if self.config.pos != "relative":
            return None
        device = self.embed.weight.device
        buckets = relative_buckets(torch.arange(start, start + T, device=device), torch.arange(S, device=device),
                                   not decoder, self.config.relative_buckets, self.config.relative_max_distance)
        table = self.dec_rel if decoder else self.enc_rel
        return table(buckets).permute(2, 0, 1)[None]          # (1, H, T, S)

    def _padding_bias(self, src_mask: torch.Tensor, dtype) -> torch.Tensor:
        """(B, 1, 1, S) additive bias: 0 for real source tokens, the dtype's minimum for padding."""
        return torch.zeros(src_mask.shape, dtype=dtype, device=src_mask.device).masked_fill(
            ~src_mask, torch.finfo(dtype).min)[:, None, None, :]

    # ---- the two stacks ------------------------------------------------------------------------

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        return src != self.config.pad_id

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        src_mask = self.source_mask(src) if src_mask is None else src_mask.bool()
        x = self._embed(src, 0, decoder=False)
        bias = self._padding_bias(src_mask, x.dtype)
        relative = self._relative_bias(src.shape[1], src.shape[1], 0, decoder=False)
        if relative is not None:
            bias = bias + relative
        for layer in self.encoder:
            x = layer(x, bias)
        return self.enc_norm(x) if self.enc_norm is not None else x

    def new_cache(self, memory: torch.Tensor, src_mask: torch.Tensor, max_len: int | None = None,
                  self_kv: bool = True) -> Seq2SeqCache:
        """A cache for decoding `memory`'s rows; without self_kv (training) the decoder attends over
        the target tokens of one call only."""
        cfg = self.config
        self_kv = SelfAttentionCache(cfg.n_dec_layer, memory.shape[0], cfg.n_head, max_len or cfg.block_size,
                                     cfg.head_dim, memory.device, memory.dtype) if self_kv else None
        cross = [layer.cross_attn.project_kv(memory) for layer in self.decoder]
        return Seq2SeqCache(self_kv, cross, self._padding_bias(src_mask.bool(), memory.dtype))

    def decode(self, tgt: torch.Tensor, cache: Seq2SeqCache, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for target tokens `tgt` (B, T) that continue what `cache` already holds."""
        start, T = cache.pos, tgt.shape[1]
        if cache.self_kv is not None and start + T > cache.self_kv.max_len:
            raise LlmkitError(f"{start + T} target tokens exceed the decoder cache capacity of {cache.self_kv.max_len}")
        x = self._embed(tgt, start, decoder=True)
        bias = self._relative_bias(T, start + T, start, decoder=True)
        if T > 1 or bias is not None:  # causal by slot: query i (slot start+i) sees keys 0..start+i
            keys, slots = torch.arange(start + T, device=x.device), torch.arange(start, start + T, device=x.device)
            causal = torch.zeros(T, start + T, dtype=x.dtype, device=x.device).masked_fill(
                keys[None, :] > slots[:, None], torch.finfo(x.dtype).min)
            bias = causal if bias is None else bias + causal
        for i, layer in enumerate(self.decoder):
            x = layer(x, bias, cache=cache.self_kv, cross_kv=cache.cross_kv[i], cross_bias=cache.cross_bias)
        if cache.self_kv is not None:
            cache.self_kv.advance(T)
        if last_only:
            x = x[:, -1:]
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        if self.config.scale_logits:
            x = x * self.config.n_embd ** -0.5
        logits = self.lm_head(x)
        return logits + self.final_logits_bias if self.config.logits_bias else logits

    def forward(self, src, tgt, targets=None, src_mask=None):
        """Teacher forcing: logits (B, T, V) for decoder inputs `tgt` (B, T) given sources `src` (B, S);
        with `targets` (B, T, -100 = ignored) also the mean cross-entropy."""
        src_mask = self.source_mask(src) if src_mask is None else src_mask.bool()
        memory = self.encode(src, src_mask)
        logits = self.decode(tgt, self.new_cache(memory, src_mask, self_kv=False))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, as for the decoder: 6N for the weights plus attention scores and
        values over T positions (encoder self, decoder self and cross: three attention blocks per pair
        of layers)."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * (cfg.n_layer + 2 * cfg.n_dec_layer) * cfg.n_head * cfg.head_dim * T
