"""Bidirectional Transformer encoder (BERT / RoBERTa style) with its task heads.

Embeddings: token + learned position + token type, then LayerNorm.
Blocks are post-LN (normalise after each residual add, as the original BERT),
with exact-erf GELU MLPs and a padding mask on attention.
One `Encoder` class carries an optional head chosen by `task`:
  None        sentence embeddings (pooled, normalised); `encode` gives the hidden states
  "mlm"       masked-LM logits over the vocabulary (output matrix tied to the token embeddings)
  "classify"  one label per sequence, from the pooled embedding
  "tag"       one label per token
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.utils import check_field_types, check_range

TASKS = (None, "mlm", "classify", "tag")


@dataclass
class EncoderConfig:
    vocab_size: int = 30522
    max_position: int = 512         # longest input the position table covers
    type_vocab_size: int = 2        # segment ids (sentence A / B)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # None means 4 * n_embd
    norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_token_id: int = 0
    pooling: str = "mean"           # "mean" over real tokens | "cls" (first token)
    normalize: bool = True          # unit-length sentence embeddings
    position_offset: int = 0        # RoBERTa numbers positions from pad_token_id + 1
    init_std: float = 0.02

    def __post_init__(self):
        check_field_types(self, "encoder config")
        for name in ("vocab_size", "max_position", "type_vocab_size", "n_layer", "n_head", "n_embd"):
            check_range(f"encoder config {name}", getattr(self, name), 1, integer=True)
        check_range("encoder config norm_eps", self.norm_eps, 0, low_open=True)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        checks = [
            (self.pooling in ("mean", "cls"), f"unknown pooling {self.pooling!r} (mean, cls)"),
            (min(self.vocab_size, self.max_position, self.type_vocab_size, self.n_layer,
                 self.n_head, self.n_embd, self.intermediate_size) > 0, "encoder sizes must be positive"),
            (self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}"),
            (0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)"),
            (0 <= self.pad_token_id < self.vocab_size, f"pad_token_id={self.pad_token_id} is outside the vocab"),
            (0 <= self.position_offset < self.max_position,
             f"position_offset={self.position_offset} leaves no positions"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlmkitError(message)

    @property
    def max_length(self) -> int:
        """Longest input in tokens, after the position offset is taken off the table."""
        return self.max_position - self.position_offset

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        if not isinstance(d, dict):
            raise LlmkitError(f"encoder config must be a mapping of settings, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LlmkitError(f"unknown encoder config keys: {', '.join(unknown)}")
        return cls(**d)


ENCODER_PRESETS: dict[str, dict] = {
    # small enough to pretrain for a few hundred steps on a laptop CPU
    "bert-tiny": dict(vocab_size=4096, max_position=128, n_layer=2, n_head=2, n_embd=128),
    "bert-mini": dict(vocab_size=8192, max_position=256, n_layer=4, n_head=4, n_embd=256),
    "minilm-l6": dict(vocab_size=30522, max_position=512, n_layer=6, n_head=12, n_embd=384,
                      intermediate_size=1536),
    "bert-base": dict(vocab_size=30522, max_position=512, n_layer=12, n_head=12, n_embd=768),
}


def encoder_preset(name: str, **overrides) -> EncoderConfig:
    if name not in ENCODER_PRESETS:
        raise LlmkitError(f"unknown encoder preset {name!r}; choose from {', '.join(ENCODER_PRESETS)}")
    return EncoderConfig(**{**ENCODER_PRESETS[name], **overrides})


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, skipped entirely where it is the identity (eval mode, or p = 0)."""
    return F.dropout(x, p, True) if training and p > 0 else x


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        # q, k and v in one matmul: one bigger GEMM runs faster than three small ones
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        y = self.attend(q, k, v, mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """softmax(q k^T / sqrt(D)) v over (B, H, T, D); mask (B, 1, 1, T) bool, True = real key."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact erf GELU, as BERT


class Block(nn.Module):
    """Post-LN: x = LN(x + f(x)), the arrangement BERT checkpoints were trained with."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)
        self.mlp_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_norm(x + dropout(self.attn(x, mask), self.dropout, self.training))
        return self.mlp_norm(x + dropout(self.mlp(x), self.dropout, self.training))


class MLMHead(nn.Module):
    """Dense + GELU + LayerNorm, then logits against the token embedding matrix (tied)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: torch.Tensor, embed_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), embed_weight, self.bias)


class Encoder(nn.Module):
    arch = "encoder"

    def __init__(self, config: EncoderConfig, task: str | None = None, labels: list[str] | None = None):
        super().__init__()
        if task not in TASKS:
            raise LlmkitError(f"unknown encoder task {task!r} (mlm, classify, tag)")
        labels = list(labels or [])
        if task in ("classify", "tag") and len(labels) < 2:
            raise LlmkitError(f"a {task} head needs at least 2 labels, got {len(labels)}")
        # label names travel with the model (and its config.json): predictions map back to them
        self.config, self.task, self.labels = config, task, labels if task in ("classify", "tag") else None
        C = config.n_embd
        self.embed = nn.Embedding(config.vocab_size, C)
        self.pos_embed = nn.Embedding(config.max_position, C)
        self.type_embed = nn.Embedding(config.type_vocab_size, C)
        self.embed_norm = nn.LayerNorm(C, eps=config.norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        if task == "mlm":
            self.mlm = MLMHead(config)
        elif task in ("classify", "tag"):
            self.head = nn.Linear(C, len(labels))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, n_embd). attention_mask (B, T): 1/True for real tokens, 0 for padding."""
        B, T = input_ids.shape
        if T > self.config.max_length:
            raise LlmkitError(f"input of {T} tokens is longer than the encoder's maximum {self.config.max_length}")
        pos = torch.arange(self.config.position_offset, self.config.position_offset + T, device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(pos)
        if token_type_ids is None:  # all segment 0: add the one row instead of gathering B*T copies
            x = x + self.type_embed.weight[0]
        else:
            x = x + self.type_embed(token_type_ids)
        x = dropout(self.embed_norm(x), self.config.dropout, self.training)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # (B, 1, 1, T) bool: every query may look at every real key; no padding masks keep the fast path
            mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per sequence: the first ([CLS]) token, or the mean over real tokens."""
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def embed_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Sentence embeddings (B, n_embd), unit length when config.normalize."""
        pooled = self.pool(self.encode(input_ids, attention_mask, token_type_ids), attention_mask)
        return F.normalize(pooled, p=2, dim=-1) if self.config.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """Returns (output, loss); loss is None without labels.

        task None: sentence embeddings (B, n_embd).  "classify": (B, num_labels) logits, labels (B,).
        "tag": (B, T, num_labels) logits, labels (B, T) with -100 ignored.
        "mlm": (B, T, vocab) logits; with labels (B, T) (-100 = not masked) only the
        labelled positions are projected, giving (N, vocab): the vocabulary matmul
        dominates MLM cost and ~85% of positions carry no loss.
        """
        if self.task is None:  # an embedding model: its output is the sentence embedding
            return self.embed_sentences(input_ids, attention_mask, token_type_ids), None
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if self.task == "mlm":
            if labels is None:
                return self.mlm(hidden, self.embed.weight), None
            keep = labels != -100
            logits = self.mlm(hidden[keep], self.embed.weight)
            if not logits.numel():  # nothing masked: a zero loss that still reaches the graph, not NaN
                return logits, hidden.sum() * 0.0
            return logits, F.cross_entropy(logits.float(), labels[keep])
        if self.task == "classify":
            pooled = dropout(self.pool(hidden, attention_mask), self.config.dropout, self.training)
            logits = self.head(pooled)
            return logits, None if labels is None else F.cross_entropy(logits.float(), labels)
        logits = self.head(dropout(hidden, self.config.dropout, self.training))
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Forward+backward training FLOPs per token: 6 N (non-embedding) + attention, as for the decoder."""
        c = self.config
        T = seq_len or c.max_length
        per_layer = 4 * c.n_embd * c.n_embd + 2 * c.n_embd * c.intermediate_size
        return 6 * c.n_layer * per_layer + 12 * c.n_layer * c.n_embd * T


def with_head(model: Encoder, task: str | None, labels: list[str] | None = None) -> Encoder:
    """A new Encoder for `task` sharing nothing with `model` but a copy of its embeddings and blocks.

    The new head starts from the usual random init (seeded by the caller's torch RNG)."""
    new = Encoder(model.config, task, labels)
    backbone = {k: v for k, v in model.state_dict().items() if not k.startswith(("mlm.", "head."))}
    missing, unexpected = new.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith(("mlm.", "head.")) for k in missing), (missing, unexpected)
    return new.to(next(model.parameters()).device)

