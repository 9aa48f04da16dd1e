"""GGUF import: llama.cpp's single-file format (metadata + quantized tensors) -> llmkit model + tokenizer.

The header is parsed here with `struct` over an mmap: `gguf.GGUFReader` builds a numpy view per
vocabulary string and takes ~6 s on SmolLM2's 98k tokens+merges, this takes a fraction of a
second. Type codes, block sizes and dequantization come from the `gguf` package.

Supported: the "llama" architecture (Llama, SmolLM, TinyLlama, Mistral-style files), tensors in any
type `gguf.quants.dequantize` handles (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, K-quants), and byte-level
BPE vocabularies (`tokenizer.ggml.model == "gpt2"`).
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.io.common import build_model, fuse_llama_layer
from llmkit.utils import progress

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # torch order (GGUF lists dimensions fastest-first)
    qtype: int
    offset: int                 # absolute byte offset in the file
    nbytes: int


class GGUFFile:
    """Metadata and lazily dequantized tensors of one .gguf file (read-only mmap)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise LlmkitError(f"no such GGUF file: {self.path}") from None
        except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
            raise LlmkitError(f"cannot read GGUF file {self.path}: {e}") from None
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError) as e:
            raise LlmkitError(f"corrupt or truncated GGUF file {self.path}: {e}") from None

    # -- header parsing -------------------------------------------------------------------
    def _take(self, fmt: str):
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("string runs past the end of the file")
        s = self._buf[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype == GGUFValueType.STRING:
            return self._string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self._take("<I"), self._take("<Q")
            if item_type in _SCALAR_FORMATS:  # numeric arrays in one numpy read
                dtype = np.dtype(_SCALAR_FORMATS[item_type])
                arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return arr.tolist()
            return [self._value(item_type) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self._take(_SCALAR_FORMATS[vtype])

    def _parse(self) -> None:
        if self._buf[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2, 3)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.meta: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("<I")
            if n_dims > 4:  # GGML_MAX_DIMS
                raise ValueError(f"tensor {name} has {n_dims} dimensions (at most 4)")
            dims = [self._take("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), self._take("<I"), self._take("<Q")))
        align = self.meta.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or not 0 < align <= 1 << 20:
            raise ValueError(f"general.alignment must be a positive integer, got {align!r}")
        data_start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            if qtype not in GGML_QUANT_SIZES:
                raise LlmkitError(f"{self.path}: tensor {name} has unknown ggml type {qtype}")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            numel = int(np.prod(shape))
            if shape and shape[-1] % block:
                raise ValueError(f"tensor {name} row of {shape[-1]} is not a multiple of its block size {block}")
            info = TensorInfo(name, shape, qtype, data_start + offset, numel // block * type_size)
            if info.offset + info.nbytes > len(self._buf):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors[name] = info

    # -- tensors --------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32, in torch dimension order."""
        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.qtype)
        raw = np.frombuffer(self._buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = raw.reshape(*info.shape[:-1], -1) if len(info.shape) > 1 else raw
        try:
            values = dequantize(rows, qtype)
        except NotImplementedError:
            raise LlmkitError(f"{self.path}: tensor {name} uses quantization type {qtype.name}, "
                              "which the installed gguf package cannot dequantize") from None
        values = np.asarray(values, dtype=np.float32).reshape(info.shape)
        if not values.flags.writeable:  # a view of the read-only mmap (F32 tensors)
            values = values.copy()
        return torch.from_numpy(values)


# -- model ------------------------------------------------------------------------------------

def config_from_gguf(g: GGUFFile) -> ModelConfig:
    arch = g.meta.get("general.architecture")
    if arch != "llama":
        raise LlmkitError(f"{g.path}: unsupported GGUF architecture {arch!r} (supported: llama)")

    def get(key, default=None, kind=int):
        """A metadata number: a positive int (counts, sizes), or any finite number for kind=float."""
        value = g.meta.get(f"llama.{key}", default)
        if value is None:
            raise LlmkitError(f"{g.path}: metadata key llama.{key} is missing")
        number = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
        if not number or (kind is int and value <= 0) or (kind is float and not math.isfinite(value)):
            raise LlmkitError(f"{g.path}: metadata key llama.{key} must be a "
                              f"{'positive integer' if kind is int else 'number'}, got {value!r}")
        return value

    scaling = g.meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear"
                                             and get("rope.scaling.factor", 1.0, float) != 1.0):
        raise LlmkitError(f"{g.path}: RoPE scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in g.tensors:
        raise LlmkitError(f"{g.path}: per-frequency RoPE factors (Llama 3.1 rope_freqs) are not supported")
    if "token_embd.weight" not in g.tensors:
        raise LlmkitError(f"{g.path}: tensor token_embd.weight is missing")
    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    # Sizes must agree with the tensors (whose extents the file's length bounds) before any are
    # allocated: a crafted block_count or embedding_length would otherwise ask for terabytes.
    layers = {name.split(".")[1] for name in g.tensors if name.startswith("blk.")}
    if g.tensors["token_embd.weight"].shape[-1] != n_embd or len(layers) != get("block_count"):
        raise LlmkitError(f"{g.path}: metadata (embedding_length {n_embd}, block_count {get('block_count')}) "
                          f"does not match the tensors ({len(layers)} blocks of width "
                          f"{g.tensors['token_embd.weight'].shape[-1]})")
    head_dim = get("attention.key_length", n_embd // n_head)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise LlmkitError(f"{g.path}: partial rotary embeddings are not supported")
    return ModelConfig(
        vocab_size=g.tensors["token_embd.weight"].shape[0],
        block_size=get("context_length"),
        n_layer=get("block_count"),
        n_head=n_head,
        n_kv_head=get("attention.head_count_kv", n_head),
        n_embd=n_embd,
        head_dim=head_dim,
        intermediate_size=get("feed_forward_length"),
        bias=False,
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        norm="rmsnorm",
        norm_eps=float(get("attention.layer_norm_rms_epsilon", kind=float)),
        mlp="swiglu",
        pos="rope",
        rope_theta=float(get("rope.freq_base", 10000.0, float)),
        tie_embeddings="output.weight" not in g.tensors,
    )


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order so the weights match the rotate-half RoPE convention.

    llama.cpp rotates adjacent pairs (x0, x1), HF Llama rotates (x_i, x_{i+d/2}); the converter
    interleaves each head's two halves to make the two agree, so we de-interleave them again.
    """
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(g: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Map and dequantize every tensor onto llmkit's state-dict names."""
    used = set()

    def take(name):
        if name not in g.tensors:
            raise LlmkitError(f"{g.path}: tensor {name} is missing")
        used.add(name)
        return g.tensor(name)

    def maybe(name):
        return take(name) if name in g.tensors else None

    state = {"embed.weight": take("token_embd.weight"), "final_norm.weight": take("output_norm.weight")}
    if not config.tie_embeddings:
        state["lm_head.weight"] = take("output.weight")
    for i in progress(range(config.n_layer), desc="dequantize", unit="layer"):
        p = f"blk.{i}."

        def qkv(kind, fetch):
            q, k, v = (fetch(p + f"attn_{x}.{kind}") for x in "qkv")
            if q is not None:
                q, k = unpermute_rope(q, config.n_head), unpermute_rope(k, config.n_kv_head)
            return q, k, v
        (q, k, v), (q_bias, k_bias, v_bias) = qkv("weight", take), qkv("bias", maybe)
        state.update(fuse_llama_layer(
            i, norm1=take(p + "attn_norm.weight"), norm2=take(p + "ffn_norm.weight"), q=q, k=k, v=v,
            q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o=take(p + "attn_output.weight"),
            gate=take(p + "ffn_gate.weight"), up=take(p + "ffn_up.weight"), down=take(p + "ffn_down.weight")))
    extra = sorted(set(g.tensors) - used)
    if extra:
        raise LlmkitError(f"{g.path}: unexpected tensors for a {config.n_layer}-layer llama: {extra[:3]}")
    return state


# -- tokenizer --------------------------------------------------------------------------------

# How each `tokenizer.ggml.pre` value splits text before BPE (llama.cpp's llama-vocab.cpp tables).
_GPT2_STYLE = {"default", "gpt2", "gpt-2", "olmo", "jais"}
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                "deepseek-r1-qwen": _QWEN2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4   # llama.cpp token types


def _pre_tokenizer(pre: str, source):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_STYLE:
        return byte_level
    if pre in _DIGITS_THEN_GPT2:
        # SmolLM/StarCoder vocabularies were trained with every digit on its own.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise LlmkitError(f"{source}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre)")


def gguf_hf_tokenizer(g: GGUFFile):
    """The `tokenizers.Tokenizer` described by the file's tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = g.meta.get("tokenizer.ggml.model")
    if kind is None:
        raise LlmkitError(f"{g.path}: no tokenizer in the file (tokenizer.ggml.model is missing)")
    if kind != "gpt2":
        raise LlmkitError(f"{g.path}: unsupported tokenizer model {kind!r} (supported: gpt2 byte-level BPE)")
    tokens = g.meta.get("tokenizer.ggml.tokens")
    merges = g.meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise LlmkitError(f"{g.path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
            and isinstance(merges, list) and all(isinstance(m, str) and " " in m for m in merges)):
        raise LlmkitError(f"{g.path}: tokenizer.ggml.tokens and .merges must be lists of strings (merges 'a b')")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    hf = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = _pre_tokenizer(g.meta.get("tokenizer.ggml.pre", "default"), g.path)
    hf.decoder = decoders.ByteLevel()
    types = g.meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens):
        raise LlmkitError(f"{g.path}: tokenizer.ggml.token_type must list one type per token")
    # Control tokens (<|im_end|>, ...) and user-defined ones must match whole, never split by BPE.
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return hf


def gguf_tokenizer(g: GGUFFile):
    """llmkit Tokenizer with the file's special ids and chat template."""
    from llmkit.tokenizer import Tokenizer

    hf = gguf_hf_tokenizer(g)  # checks the vocabulary first
    ids = {name: g.meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding", "eot")}
    vocab = len(g.meta["tokenizer.ggml.tokens"])
    for name, i in ids.items():
        if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab):
            raise LlmkitError(f"{g.path}: tokenizer.ggml.{name}_token_id {i!r} is not a token id (0..{vocab - 1})")
    template = g.meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise LlmkitError(f"{g.path}: tokenizer.chat_template must be a string, got {type(template).__name__}")
    return Tokenizer.from_hf(hf, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"],
                             chat_template=template,
                             stop_ids=[i for i in (ids["eot"], ids["eos"]) if i is not None])


def load_gguf(path, device="cpu"):
    """(model, tokenizer) from a .gguf file (or its parsed GGUFFile); weights dequantized to float32."""
    g = path if isinstance(path, GGUFFile) else GGUFFile(path)
    config = config_from_gguf(g)
    tokenizer = gguf_tokenizer(g)
    model = build_model(config, gguf_state_dict(g, config), g.path)
    return model.to(device), tokenizer
