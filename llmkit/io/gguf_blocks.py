"""GGUF -> llmkit model whose linear layers and token embedding keep the file's quantized blocks.

The file is memory-mapped copy-on-write: tensors used as they lie (the token embedding, the attention
output and feed-forward down projections) are views of the mapping, read from disk as they are first
touched and never copied. llmkit's fused rows (q/k/v, gate/up) and llama.cpp's q/k row order need new
tensors; those are read with plain file reads, so their pages are never mapped as well.
Norm weights (F32) are read as float32. Linear weights must be Q8_0, Q4_0 or Q4_1 (or float: those
layers stay float32); any other type is a clear error that points to --dtype float32.
"""
from __future__ import annotations

import mmap

import torch
from gguf import GGMLQuantizationType

from llmkit.errors import LlmkitError
from llmkit.infer.quant import FORMATS, QuantWeight, build_quantized_model
from llmkit.io.gguf import GGUFFile, config_from_gguf, gguf_tokenizer, unpermute_rope

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
_FORMAT_OF_TYPE = {code: name for name, code in FORMATS.items()}


class _Blocks:
    """Raw tensor bytes of one GGUF file, as uint8 (rows, row bytes) tensors."""

    def __init__(self, g: GGUFFile):
        self.g = g
        with open(g.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view for torch, never written
        self._file = open(g.path, "rb")

    def format(self, name: str) -> str | None:
        """'q8_0' / 'q4_0' / 'q4_1', None for a float tensor; an error for any other type."""
        qtype = GGMLQuantizationType(self.g.tensors[name].qtype)
        if qtype in FLOAT_TYPES:
            return None
        if qtype.value not in _FORMAT_OF_TYPE:
            raise LlmkitError(f"{self.g.path}: tensor {name} is {qtype.name}; llmkit runs q8_0, q4_0 and q4_1 "
                              f"blocks as they are (pass --dtype float32 to expand this file instead)")
        return _FORMAT_OF_TYPE[qtype.value]

    def _shape(self, name):
        info = self.g.tensors[name]
        return info.shape[0], info.nbytes // info.shape[0]

    def mapped(self, name: str) -> torch.Tensor:
        info = self.g.tensors[name]
        return torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset).view(
            self._shape(name))

    def read_rows(self, names: list[str], heads: dict[str, int]) -> torch.Tensor:
        """The tensors `names` stacked by rows, read straight into one new tensor (no second copy);
        the q/k ones (in `heads`) put back in rotate-half row order."""
        shapes = [self._shape(n) for n in names]
        out = torch.empty(sum(rows for rows, _ in shapes), shapes[0][1], dtype=torch.uint8)
        start = 0
        for name, (rows, _) in zip(names, shapes):
            part = out[start:start + rows]
            self._file.seek(self.g.tensors[name].offset)
            if self._file.readinto(memoryview(part.numpy()).cast("B")) != part.numel():
                raise LlmkitError(f"{self.g.path}: tensor {name} is truncated")
            if name in heads:
                part.copy_(unpermute_rope(part, heads[name]))
            start += rows
        return out


def _layer_weights(blocks: _Blocks, i: int, config, state: dict, weights: dict) -> None:
    """Block i's quantized (or float) projections under llmkit's module names."""
    p, g = f"blk.{i}.", blocks.g
    names = {x: p + f"attn_{x}.weight" for x in "qkv"}
    fused = {"attn.qkv": [names["q"], names["k"], names["v"]], "mlp.gate_up": [p + "ffn_gate.weight", p + "ffn_up.weight"],
             "attn.proj": [p + "attn_output.weight"], "mlp.proj": [p + "ffn_down.weight"]}
    heads = {names["q"]: config.n_head, names["k"]: config.n_kv_head}
    for module, parts in fused.items():
        formats = {blocks.format(t) for t in parts}
        target = f"blocks.{i}.{module}"
        if formats == {None} or len(formats) > 1:  # float layers, or parts in different types: float32
            tensors = [unpermute_rope(g.tensor(t), heads[t]) if t in heads else g.tensor(t) for t in parts]
            state[target + ".weight"] = torch.cat(tensors)
            continue
        if len(parts) == 1:
            weights[target] = QuantWeight(formats.pop(), blocks.mapped(parts[0]))
            continue
        if len({blocks._shape(t)[1] for t in parts}) > 1:
            raise LlmkitError(f"{g.path}: the tensors of {target} have rows of different lengths")
        weights[target] = QuantWeight(formats.pop(), blocks.read_rows(parts, heads))
    if p + "attn_q.bias" in g.tensors:
        q, k, v = (g.tensor(p + f"attn_{x}.bias") for x in "qkv")
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [unpermute_rope(q, config.n_head), unpermute_rope(k, config.n_kv_head), v])
    state[f"blocks.{i}.attn_norm.weight"] = g.tensor(p + "attn_norm.weight")
    state[f"blocks.{i}.mlp_norm.weight"] = g.tensor(p + "ffn_norm.weight")


def runs_in_blocks(g: GGUFFile) -> bool:
    """Whether loading the file as stored keeps quantized blocks: some weights are q8_0/q4_0/q4_1 and none
    is of a type the kernels lack (such a file, or an all-float one, loads expanded as before)."""
    types = {GGMLQuantizationType(info.qtype) for info in g.tensors.values()}
    kept = {GGMLQuantizationType(code) for code in FORMATS.values()}
    return bool(types & kept) and types <= kept | set(FLOAT_TYPES)


def load_gguf_quantized(path):
    """(model, tokenizer) from a .gguf file (or its parsed GGUFFile) with its q8_0/q4_0/q4_1 weights kept
    as they are stored."""
    g = path if isinstance(path, GGUFFile) else GGUFFile(path)
    config = config_from_gguf(g)
    tokenizer = gguf_tokenizer(g)
    blocks = _Blocks(g)
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(config.n_layer):
        expected |= {f"blk.{i}.{t}.weight" for t in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v",
                                                     "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
        expected |= {f"blk.{i}.attn_{x}.bias" for x in "qkv"}
    missing = sorted({n for n in expected if "bias" not in n and n != "output.weight"} - set(g.tensors))
    extra = sorted(set(g.tensors) - expected)
    if missing or extra:
        raise LlmkitError(f"{g.path}: tensors do not match a {config.n_layer}-layer llama: "
                          f"missing {missing[:3]}, unexpected {extra[:3]}")
    state = {"final_norm.weight": g.tensor("output_norm.weight")}
    weights: dict[str, QuantWeight] = {}
    for name, module in (("token_embd.weight", "embed"), ("output.weight", "lm_head")):
        if name not in g.tensors:
            continue
        fmt = blocks.format(name)
        if fmt is None:
            state[module + ".weight"] = g.tensor(name)
        else:
            weights[module] = QuantWeight(fmt, blocks.mapped(name))
    if config.tie_embeddings:  # one table serves both, as stored
        if "embed" in weights:
            weights["lm_head"] = weights["embed"]
        else:
            state["lm_head.weight"] = state["embed.weight"]
    for i in range(config.n_layer):
        _layer_weights(blocks, i, config, state, weights)
    model = build_quantized_model(config, state, weights, g.path)
    if config.tie_embeddings and "embed" not in weights:
        model.lm_head.weight = model.embed.weight
    return model, tokenizer

