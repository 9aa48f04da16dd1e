"""Model configuration: one dataclass for every decoder variant, plus named presets.

GPT-2 style:  pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True
              (nanoGPT and BERT use the exact erf GELU instead: mlp="gelu_erf")
Llama style:  pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head < n_head (GQA)
Original Transformer positions: pos="sinusoidal".
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from llmkit.errors import LlmkitError
from llmkit.utils import check_field_types, check_range


MAX_CONTEXT = 1 << 20  # tokens; far beyond any context llmkit can run, far below a corrupt value


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    block_size: int = 1024          # longest context the model is built for
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None    # grouped-query attention; None means n_head (plain MHA)
    n_embd: int = 768
    head_dim: int | None = None     # None means n_embd // n_head
    intermediate_size: int | None = None  # MLP hidden width; None: 4*n_embd (gelu) or Llama's 8/3 rule (swiglu)
    dropout: float = 0.0
    bias: bool = True               # biases on every linear layer (GPT-2)
    qkv_bias: bool | None = None    # bias on q/k/v only (Qwen2); None follows `bias`
    norm: str = "layernorm"         # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"               # "gelu" (tanh approximation, as GPT-2) | "gelu_erf" (exact) | "swiglu"
    pos: str = "learned"            # "learned" | "rope" | "sinusoidal"
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self):
        check_field_types(self, "model config")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check_range(f"model config {name}", getattr(self, name), 1, integer=True)
        # Position tables are allocated up front: a corrupt 2**40 would exhaust memory, not fail.
        check_range("model config block_size", self.block_size, 1, MAX_CONTEXT, integer=True)
        for name in ("n_kv_head", "head_dim", "intermediate_size"):
            if getattr(self, name) is not None:
                check_range(f"model config {name}", getattr(self, name), 1, integer=True)
        check_range("model config dropout", self.dropout, 0, 1, high_open=True)
        check_range("model config norm_eps", self.norm_eps, 0, low_open=True)
        check_range("model config rope_theta", self.rope_theta, 0, low_open=True)
        check_range("model config init_std", self.init_std, 0)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise LlmkitError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.intermediate_size is None:
            if self.mlp == "swiglu":
                hidden = int(2 * 4 * self.n_embd / 3)
                self.intermediate_size = 64 * ((hidden + 63) // 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r} (layernorm, rmsnorm)"),
            (self.mlp in ("gelu", "gelu_erf", "swiglu"), f"unknown mlp {self.mlp!r} (gelu, gelu_erf, swiglu)"),
            (self.pos in ("learned", "rope", "sinusoidal"), f"unknown pos {self.pos!r} (learned, rope, sinusoidal)"),
            (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}"),
            (self.pos != "rope" or self.head_dim % 2 == 0, "rope needs an even head_dim"),
        ]
        for ok, message in checks:
            if not ok:
                raise LlmkitError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise LlmkitError(f"model config must be a mapping of settings, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LlmkitError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LlmkitError(f"cannot read model config {path}: {e}") from None
        return cls.from_dict(d.get("model", d) if isinstance(d, dict) else d)


PRESETS: dict[str, dict] = {
    # nanoGPT's shakespeare-char baby model, scaled for a laptop CPU
    "char-tiny": dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False, mlp="gelu_erf"),
    "gpt2-124m": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "llama-tiny": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=8, n_kv_head=2, n_embd=256,
                       bias=False, norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", pos="rope", tie_embeddings=False),
    "transformer-tiny": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256, pos="sinusoidal"),
    "smollm2-135m": dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         intermediate_size=1536, bias=False, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                         pos="rope", rope_theta=100000.0, tie_embeddings=True, init_std=0.041666666666666664),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise LlmkitError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
