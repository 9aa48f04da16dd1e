"""Quantized inference: linear layers and token embeddings that keep GGUF's 32-value blocks.

    from llmkit.infer.quant import QuantWeight, build_quantized_model
    model = build_quantized_model(config, float_state, {"blocks.0.attn.qkv": QuantWeight("q4_1", blocks), ...})

Formats (ggml's, byte for byte): q8_0 (fp16 scale + 32 int8), q4_0 (fp16 scale + 32 nibbles, value
(q - 8) * d) and q4_1 (fp16 scale and minimum + 32 nibbles, value q * d + m). The blocks are uint8
tensors of (out_features, in_features / 32 * block bytes), usually views of a memory-mapped file.

`quantize_linears` is the module swap: each named nn.Linear (or nn.Embedding) becomes a QuantLinear
(QuantEmbedding) over its blocks. Their kernels (quant_kernels.cpp) are built on first use like
llmkit.kernels and pick the instruction set at run time; LLMKIT_QUANT_ISA=generic|avx2|avx512_vnni
forces one (tests force each). A few rows (decoding, the server's batched steps) go through integer
dot products on int16-rounded activations (llama.cpp's int8 changed SmolLM2's greedy answers); more
rows (prefill, perplexity) through float32 tiles dequantized on the fly and PyTorch's GEMM. Without a compiler both fall back to gguf's numpy
dequantization and PyTorch's matmul: slower, nothing else changes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmkit.errors import LlmkitError

QK = 32                                                  # values per block, every format
FORMATS = {"q8_0": 8, "q4_0": 2, "q4_1": 3}             # name -> ggml type code
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
ISAS = {"best": 0, "generic": 1, "avx2": 2, "avx512_vnni": 3}
INTEGER_ROWS = 8          # up to this many activation rows: integer dot products; more: GEMM on tiles
TILE_VALUES = 1 << 20     # weights dequantized per GEMM tile (4 MB of float32: stays in cache)

SOURCE = Path(__file__).with_name("quant_kernels.cpp")
INCLUDES = tuple(Path(__file__).with_name(name) for name in ("quant_isa.inc", "decode_ops.inc", "quant_step.inc"))
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++20"]   # no -m flags: ISAs are chosen at run time
_state: dict = {}


def available() -> bool:
    """Whether the quantized kernels are loaded, building them on the first call if need be."""
    if "loaded" not in _state:
        from llmkit.infer import kernels

        _state["loaded"] = False
        compiler = kernels._compiler()
        if os.environ.get("LLMKIT_KERNELS", "1") == "0" or compiler is None:
            return False
        try:
            torch.ops.load_library(str(kernels._build(compiler, SOURCE, FLAGS, INCLUDES)))
            _register_fakes()
            _state["loaded"] = True
        except (OSError, RuntimeError) as err:
            warnings.warn(f"llmkit's quantized kernels could not be built ({err}); using PyTorch's matmul")
    return _state["loaded"]


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""
    @torch.library.register_fake("llmkit_quant::linear")
    def _(x, blocks, fmt, bias, isa):
        return x.new_empty((*x.shape[:-1], blocks.shape[0]))


def isa() -> int:
    """The instruction set the kernels use: LLMKIT_QUANT_ISA if set (an error if this CPU lacks it), else the
    best. Settled once per value of the variable: every layer asks on every call."""
    name = os.environ.get("LLMKIT_QUANT_ISA", "best")
    if _state.get("isa_name") != name:
        if name not in ISAS:
            raise LlmkitError(f"LLMKIT_QUANT_ISA={name!r} is not one of {', '.join(ISAS)}")
        if not torch.ops.llmkit_quant.isa_supported(ISAS[name]):
            raise LlmkitError(f"LLMKIT_QUANT_ISA={name}: this CPU does not support it")
        _state["isa"] = ISAS[name] or torch.ops.llmkit_quant.best_isa()
        _state["isa_name"] = name
    return _state["isa"]


def isa_name() -> str:
    """The name of the instruction set in use ('avx2', ...), or 'pytorch' without the kernels."""
    if not available():
        return "pytorch"
    return {code: name for name, code in ISAS.items()}[isa()]


def supported_isas() -> list[str]:
    return [name for name, code in ISAS.items() if code and available() and torch.ops.llmkit_quant.isa_supported(code)]


@dataclass
class QuantWeight:
    """One weight matrix in blocks: format name and a uint8 (out_features, row bytes) tensor."""
    format: str
    blocks: torch.Tensor

    def __post_init__(self):
        if self.format not in FORMATS:
            raise LlmkitError(f"unsupported quantization format {self.format!r} (supported: {', '.join(FORMATS)})")
        if self.blocks.dtype != torch.uint8 or self.blocks.dim() != 2 or self.blocks.shape[1] % BLOCK_BYTES[self.format]:
            raise LlmkitError(f"{self.format} blocks must be a uint8 (rows, blocks * {BLOCK_BYTES[self.format]}) "
                              f"tensor, got {self.blocks.dtype} {tuple(self.blocks.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0], self.blocks.shape[1] // BLOCK_BYTES[self.format] * QK


def dequantize_numpy(blocks: torch.Tensor, fmt: str) -> np.ndarray:
    """gguf's own (numpy) dequantization of (rows, row bytes) blocks: float32 (rows, in_features)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(blocks.numpy(), GGMLQuantizationType(FORMATS[fmt]))


def dequantize(blocks: torch.Tensor, fmt: str, first: int = 0, count: int | None = None) -> torch.Tensor:
    """Rows first..first+count-1 of the blocks as a float32 matrix."""
    count = blocks.shape[0] - first if count is None else count
    if available():
        return torch.ops.llmkit_quant.dequantize(blocks, FORMATS[fmt], first, count, isa())
    return torch.from_numpy(dequantize_numpy(blocks[first:first + count], fmt))


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as blocks (buffers: blocks, bias). Activations in float32."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.format = weight.format
        self.out_features, self.in_features = weight.shape
        self.register_buffer("blocks", weight.blocks)
        self.register_buffer("bias", None if bias is None else bias.float())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float()
        rows = x.numel() // self.in_features
        if available() and rows <= INTEGER_ROWS and not torch.is_grad_enabled():
            y = torch.ops.llmkit_quant.linear(x, self.blocks, FORMATS[self.format], self.bias, isa())
        else:
            # Tiles of output rows: each tile's float32 weights are made, used and dropped while in cache.
            step = max(1, TILE_VALUES // self.in_features)
            y = torch.cat([F.linear(x, dequantize(self.blocks, self.format, i, min(step, self.out_features - i)))
                           for i in range(0, self.out_features, step)], dim=-1)
            if self.bias is not None:
                y = y + self.bias
        return y.to(dtype)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.blocks, self.format)


class QuantEmbedding(nn.Module):
    """Token embedding looked up from its blocks: only the requested rows are expanded."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.format = weight.format
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("blocks", weight.blocks)

    @property
    def weight(self) -> torch.Tensor:
        """An empty float32 tensor on the blocks' device: the dtype and device rows come out in, which is
        what GPT asks of its embedding (kv_dtype, new_cache); the table itself stays in blocks."""
        return torch.empty(0, device=self.blocks.device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if available():
            return torch.ops.llmkit_quant.embedding(idx, self.blocks, FORMATS[self.format], isa())
        return torch.cat([dequantize(self.blocks, self.format, int(i), 1) for i in idx.flatten()]).view(
            *idx.shape, self.embedding_dim)


def decode_block_applies(block: nn.Module, x: torch.Tensor, rope, cache, mask) -> bool:
    """Whether this call of a decoder Block is one token of one row over a float32 cache, and the block
    is Llama-style (RMSNorm, RoPE, SwiGLU) with its four linears quantized: then `decode_block` runs it
    in one kernel call instead of ~65 PyTorch ops (the CPU path for single-row decoding)."""
    if (mask is not None or cache is None or rope is None or rope[0].dim() != 2 or x.shape[:2] != (1, 1)
            or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous() or torch.is_grad_enabled()
            or block.training):
        return False
    if (cache.index is not None or cache.positions is not None or cache.k.dtype != torch.float32
            or cache.end != cache.start + 1):
        return False
    if "_fused" not in block.__dict__:
        block._fused = _fused_arguments(block)
    return (block._fused is not None and all(n.weight.dtype == torch.float32 for n in block._fused[0])
            and available() and isa() >= ISAS["avx2"])


def _fused_arguments(block: nn.Module) -> tuple | None:
    """The modules decode_block reads `block`'s weights from (norms, linears), or None if it is not a
    block decode_block runs. Their tensors are read at every call: a later .to() or load replaces them."""
    from llmkit.model.layers import RMSNorm, SwiGLU

    attn, mlp, norms = block.attn, block.mlp, (block.attn_norm, block.mlp_norm)
    if not (isinstance(mlp, SwiGLU) and all(isinstance(n, RMSNorm) for n in norms)):
        return None
    linears = (attn.qkv, attn.proj, mlp.gate_up, mlp.proj)
    if not all(isinstance(m, QuantLinear) for m in linears) or norms[0].eps != norms[1].eps or attn.head_dim % 8:
        return None
    return norms, linears


def decode_block(block: nn.Module, x: torch.Tensor, rope, cache) -> torch.Tensor:
    """Block.forward for one token of row 0, in one call (see decode_block_applies)."""
    norms, linears = block._fused
    return torch.ops.llmkit_quant.decode_block(
        x, [n.weight for n in norms], norms[0].eps, [m.blocks for m in linears], [FORMATS[m.format] for m in linears],
        [m.bias for m in linears], rope[0], rope[1], cache.k, cache.v, cache.start, block.attn.n_head, isa())


def quantize_linears(model: nn.Module, weights: dict[str, QuantWeight]) -> nn.Module:
    """The module swap: each module named in `weights` (an nn.Linear, or an nn.Embedding) becomes a
    QuantLinear (QuantEmbedding) over those blocks, keeping a Linear's bias. Returns `model`."""
    for name, weight in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(weight)
            expected = (old.num_embeddings, old.embedding_dim)
        else:
            new = QuantLinear(weight, None if old.bias is None or old.bias.is_meta else old.bias.detach())
            expected = (old.out_features, old.in_features)
        if weight.shape != expected:
            raise LlmkitError(f"{name}: quantized weight of shape {weight.shape}, the model expects {expected}")
        setattr(parent, child, new)
    return model


def check_blockable(name: str, shape) -> None:
    """A clear error for a matrix whose rows cannot be cut into blocks of 32."""
    if shape[-1] % QK:
        raise LlmkitError(f"{name}: rows of {shape[-1]} values cannot be quantized in blocks of {QK} "
                          f"(the model is too small or oddly shaped for q8_0/q4_0/q4_1)")


class _MetaWeights(torch.overrides.TorchFunctionMode):
    """Builds a model's parameters on the meta device, with no values and without initializing them.
    Unlike torch.device("meta"), computed tables (RoPE's) are made for real, and no op on a meta tensor
    runs: those pull in PyTorch's Python meta kernels (sympy, dynamo), ~80 MB of resident memory, a
    fifth of a quantized SmolLM2's."""

    FACTORIES = (torch.empty, torch.ones, torch.zeros)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FACTORIES and kwargs.get("device") is None:
            return func(*args, **{**kwargs, "device": "meta"})
        target = args[0] if args else kwargs.get("tensor")
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and getattr(target, "is_meta", False):
            return target  # an initializer (normal_, uniform_, zero_, ...): nothing to fill
        return func(*args, **kwargs)


def build_quantized_model(config, state: dict[str, torch.Tensor], weights: dict[str, QuantWeight], source):
    """A GPT whose modules in `weights` are quantized and whose other tensors come from `state`
    (float), without ever allocating the float weights it replaces (built on the meta device)."""
    from llmkit.model.decoder import GPT

    with _MetaWeights():
        model = GPT(config)
    # bias tensors of quantized linears come from the state, not from the meta model
    for name in weights:
        if name + ".bias" in state:
            model.get_submodule(name).bias = nn.Parameter(state[name + ".bias"], requires_grad=False)
    quantize_linears(model, weights)
    floats = {k: v for k, v in state.items() if not any(k.startswith(n + ".") for n in weights)}
    expected = {k for k, v in model.state_dict().items() if v.is_meta}
    missing, unexpected = sorted(expected - set(floats)), sorted(set(floats) - expected)
    if missing or unexpected:
        raise LlmkitError(f"{source}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(floats, strict=False, assign=True)
    return model.requires_grad_(False).eval()
