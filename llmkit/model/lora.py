"""LoRA: low-rank adapters on chosen linear layers (Hu et al., 2021).

A wrapped layer computes  y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T
with W and b frozen and only A (rank x in) and B (out x rank) trained. B starts
at zero, so a freshly adapted model is exactly the base model.

`LoRALinear` registers the base layer's own `weight` and `bias` Parameters under
the same names, so the model's state-dict keys do not change: a base checkpoint
still loads into an adapted model, and the adapter tensors are just the extra
`*.lora_A` / `*.lora_B` entries. Those are saved alone (adapter.safetensors +
adapter_config.json) and can be merged into W for inference at no extra cost.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmkit.errors import LlmkitError
from llmkit.utils import atomic_open, atomic_path, check_state

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ALL_LINEAR = "all-linear"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module-name suffixes ("qkv" matches "blocks.3.attn.qkv"), or ["all-linear"] for
    # every nn.Linear except the output head.
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.rank <= 0:
            raise LlmkitError(f"LoRA rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise LlmkitError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LlmkitError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise LlmkitError("LoRA needs at least one target module")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # The very same Parameter objects: tied weights stay tied, names stay "weight"/"bias".
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        # Same init as nn.Linear's weight for A; B = 0 makes the update start at zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        # Scale the rank-sized intermediate (rank multiplies per token, not out_features) and add in
        # place: linear's output is not saved for its backward, so no extra (tokens x out) buffer.
        low = F.linear(self.dropout(x), self.lora_A) * self.scaling
        return out.add_(F.linear(low, self.lora_B))

    def merged(self) -> nn.Linear:
        """A plain Linear holding W + (alpha/rank) B A, sharing no storage with this layer."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                       device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            # Accumulate in float32 so a bf16 base is rounded once, not twice.
            w = self.weight.float() + self.delta_weight().float()
            layer.weight.copy_(w.to(self.weight.dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _tied_to_embedding(model: nn.Module, name: str, layer: nn.Linear) -> bool:
    """True when `layer.weight` is shared with another module (e.g. lm_head tied to embed)."""
    return any(p is layer.weight for other, p in model.named_parameters(remove_duplicate=False)
               if not other.startswith(name + "."))


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the nn.Linear modules selected by `targets`; unknown targets are errors."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            hits = [n for n, m in linears.items() if not _tied_to_embedding(model, n, m)
                    and not n.endswith("lm_head")]
        else:
            hits = [n for n in linears if n == target or n.endswith("." + target)]
        if not hits:
            suffixes = sorted({n.split(".")[-1] if "blocks." in n else n for n in linears})
            raise LlmkitError(f"LoRA target module {target!r} matches no linear layer; "
                              f"available: {', '.join(suffixes)}")
        for name in hits:
            if _tied_to_embedding(model, name, linears[name]):
                raise LlmkitError(f"LoRA target {name!r} shares its weight with the embedding "
                                  "(tie_embeddings); adapting it would change the input embedding too")
        chosen.update(hits)
    return sorted(chosen)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every base parameter and wrap the target layers in place; returns their names."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise LlmkitError("model already has LoRA adapters; merge or reload it first")
    names = find_targets(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), config.rank,
                                            config.alpha, config.dropout))
    model.lora_config = config
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, keyed like the model's state dict."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
        out[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir, extra: dict | None = None, state: dict | None = None) -> Path:
    """Write adapter.safetensors + adapter_config.json (each atomically) into `out_dir`; `state`, when
    given, holds the adapter tensors already gathered (a sharded model's own are slices)."""
    state = lora_state_dict(model) if state is None else state
    if not state:
        raise LlmkitError("model has no LoRA adapters to save")
    config: LoRAConfig = model.lora_config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / ADAPTER_WEIGHTS) as tmp:
        save_file({k: v.cpu() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    meta = {"lora": asdict(config), "modules": sorted(lora_modules(model)), **(extra or {})}
    with atomic_open(out_dir / ADAPTER_CONFIG) as f:
        json.dump(meta, f, indent=2)
    return out_dir


def read_adapter_config(path) -> dict:
    path = Path(path)
    try:
        with open(path / ADAPTER_CONFIG, encoding="utf-8") as f:
            meta = json.load(f)
        LoRAConfig(**meta["lora"])  # validates
        return meta
    except FileNotFoundError:
        raise LlmkitError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LlmkitError(f"cannot read {path / ADAPTER_CONFIG}: {e}") from None


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _read_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / ADAPTER_WEIGHTS))
    except FileNotFoundError:
        raise LlmkitError(f"missing adapter weights {path / ADAPTER_WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmkitError(f"corrupt adapter weights {path / ADAPTER_WEIGHTS}: {e}") from None


def load_adapter_weights(model: nn.Module, path) -> None:
    """Copy saved adapter tensors into a model that already carries adapters of the same layout."""
    path = Path(path)
    state = _read_adapter_weights(path)
    check_state(state, lora_state_dict(model), path, "adapter weights")
    modules = lora_modules(model)
    with torch.no_grad():
        for key, tensor in state.items():
            name, _, which = key.rpartition(".")
            getattr(modules[name], which).copy_(tensor)


def load_adapter(model: nn.Module, path) -> list[str]:
    """Wrap `model` with the adapter saved in `path` and load its weights; a mismatch leaves it untouched."""
    path = Path(path)
    meta = read_adapter_config(path)
    config = LoRAConfig(**meta["lora"])
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [n for n in meta["modules"] if n not in linears]
    if missing:
        raise LlmkitError(f"adapter {path} targets layers the model does not have: {missing[:3]}")
    state = _read_adapter_weights(path)
    for name in meta["modules"]:
        layer = linears[name]
        for key, shape in ((f"{name}.lora_A", (config.rank, layer.in_features)),
                           (f"{name}.lora_B", (layer.out_features, config.rank))):
            if key not in state:
                raise LlmkitError(f"adapter {path} lacks {key}")
            if tuple(state[key].shape) != shape:
                raise LlmkitError(f"adapter {path}: {key} has shape {tuple(state[key].shape)}, "
                                  f"the model needs {shape}")
    names = apply_lora(model, LoRAConfig(**{**asdict(config), "targets": meta["modules"]}))
    load_adapter_weights(model, path)
    model.lora_config = config
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and drop the LoRA layers (in place)."""
    for name, module in lora_modules(model).items():
        _set_module(model, name, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied Parameters are counted once."""
    params = list(model.parameters())  # parameters() already skips duplicates
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
