"""llmkit -> GGUF export (llama.cpp's single-file format), written with the `gguf` package's GGUFWriter.

    llmkit convert MODEL OUT.gguf --to gguf [--type f32|f16|q8_0|q4_0|q4_1]

Llama-style decoders (RMSNorm, SwiGLU, RoPE, no biases besides q/k/v) with byte-level BPE vocabularies.
The layout is llama.cpp's: separate q/k/v and gate/up tensors, q/k rows in its interleaved RoPE
order (the inverse of llmkit.io.gguf.unpermute_rope). Linear weights of a model that is already
quantized are written as their blocks, byte for byte (a GGUF -> llmkit -> GGUF round trip keeps every
block); float models are rounded by gguf's quantizer (round to nearest). The token embedding is
written as q8_0 for the 4-bit types, as llama.cpp's own Q4 files do.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

from llmkit.errors import LlmkitError
from llmkit.infer.quant import FORMATS, QuantEmbedding, QuantLinear, check_blockable, dequantize
from llmkit.utils import atomic_path

TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
         **{name: GGMLQuantizationType(code) for name, code in FORMATS.items()}}
FILE_TYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1}


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order from the rotate-half one (rows of floats or of blocks alike)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_model(model) -> None:
    cfg = model.config
    problems = [what for what, bad in (
        ("RMSNorm", cfg.norm != "rmsnorm"), ("SwiGLU", cfg.mlp != "swiglu"), ("RoPE", cfg.pos != "rope"),
        ("no biases besides q/k/v", cfg.bias)) if bad]
    if problems:
        raise LlmkitError(f"GGUF export supports Llama-style decoders; this model lacks: {', '.join(problems)}")


def _tensor(module, rows: slice | None, fmt: str):
    """(array, raw dtype) of a Linear/Embedding's weight rows in type `fmt`: blocks already in that
    format as they are, anything else through float32."""
    qtype = TYPES[fmt]
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        blocks = module.blocks if rows is None else module.blocks[rows]
        if module.format == fmt:
            return blocks.numpy(), qtype
        weight = dequantize(blocks.contiguous(), module.format)
    else:
        weight = module.weight.detach() if rows is None else module.weight.detach()[rows]
    weight = weight.float().contiguous().numpy()
    if qtype == GGMLQuantizationType.F32:
        return weight, qtype
    if qtype == GGMLQuantizationType.F16:
        return weight.astype(np.float16), qtype
    from gguf.quants import quantize
    return quantize(weight, qtype), qtype


def _weight_type(module, requested: str) -> str:
    """A quantized module keeps its own format unless a float type is asked for."""
    if isinstance(module, (QuantLinear, QuantEmbedding)) and requested in FORMATS:
        return module.format
    return requested


def _add_tokenizer(writer: GGUFWriter, tokenizer) -> None:
    spec = json.loads(tokenizer.hf.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise LlmkitError("GGUF export needs a byte-level BPE tokenizer (this one is not)")
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if kinds == ["ByteLevel"]:
        writer.add_tokenizer_pre("gpt2")
    elif kinds == ["Digits", "ByteLevel"]:
        writer.add_tokenizer_pre("smollm")
    else:
        raise LlmkitError(f"GGUF export: no llama.cpp pre-tokenizer matches {kinds}")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in spec.get("added_tokens", [])} - special
    types = [TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL
             for i in range(len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id)):
        if value is not None:
            setter(value)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_config(writer: GGUFWriter, cfg, file_type: str) -> None:
    w = writer
    for setter, value in ((w.add_context_length, cfg.block_size), (w.add_embedding_length, cfg.n_embd),
                          (w.add_block_count, cfg.n_layer), (w.add_feed_forward_length, cfg.intermediate_size),
                          (w.add_head_count, cfg.n_head), (w.add_head_count_kv, cfg.n_kv_head),
                          (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                          (w.add_rope_dimension_count, cfg.head_dim), (w.add_layer_norm_rms_eps, cfg.norm_eps),
                          (w.add_rope_freq_base, cfg.rope_theta), (w.add_vocab_size, cfg.vocab_size),
                          (w.add_file_type, FILE_TYPES[file_type])):
        setter(value)


def _add_tensors(writer: GGUFWriter, model, type_name: str) -> None:
    cfg = model.config
    embed_type = "q8_0" if type_name in ("q4_0", "q4_1") else type_name

    def add(name, module, requested, rows=None, heads=None):
        fmt = _weight_type(module, requested)
        array, qtype = _tensor(module, rows, fmt)
        writer.add_tensor(name, permute_rope(array, heads) if heads else array, raw_dtype=qtype)

    def norm(name, module):
        writer.add_tensor(name, module.weight.detach().float().numpy())
    add("token_embd.weight", model.embed, embed_type)
    norm("output_norm.weight", model.final_norm)
    if not cfg.tie_embeddings:
        add("output.weight", model.lm_head, embed_type)
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        qkv = block.attn.qkv
        add(p + "attn_q.weight", qkv, type_name, slice(0, q_rows), cfg.n_head)
        add(p + "attn_k.weight", qkv, type_name, slice(q_rows, q_rows + kv_rows), cfg.n_kv_head)
        add(p + "attn_v.weight", qkv, type_name, slice(q_rows + kv_rows, None))
        if qkv.bias is not None:
            b = qkv.bias.detach().float().numpy()
            writer.add_tensor(p + "attn_q.bias", permute_rope(b[:q_rows], cfg.n_head))
            writer.add_tensor(p + "attn_k.bias", permute_rope(b[q_rows:q_rows + kv_rows], cfg.n_kv_head))
            writer.add_tensor(p + "attn_v.bias", b[q_rows + kv_rows:])
        add(p + "attn_output.weight", block.attn.proj, type_name)
        add(p + "ffn_gate.weight", block.mlp.gate_up, type_name, slice(0, cfg.intermediate_size))
        add(p + "ffn_up.weight", block.mlp.gate_up, type_name, slice(cfg.intermediate_size, None))
        add(p + "ffn_down.weight", block.mlp.proj, type_name)
        norm(p + "attn_norm.weight", block.attn_norm)
        norm(p + "ffn_norm.weight", block.mlp_norm)


def save_gguf(model, tokenizer, path, type_name: str = "f16") -> Path:
    """Write `model` (float or quantized) and its tokenizer as a GGUF file, atomically."""
    if type_name not in TYPES:
        raise LlmkitError(f"unsupported GGUF tensor type {type_name!r} (supported: {', '.join(TYPES)})")
    _check_model(model)
    if type_name in FORMATS:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                check_blockable(name, module.weight.shape)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = GGUFWriter(str(tmp), "llama")
        writer.add_name("llmkit model")
        _add_config(writer, model.config, type_name)
        _add_tokenizer(writer, tokenizer)
        _add_tensors(writer, model, type_name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path
