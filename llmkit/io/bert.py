"""Import Hugging Face BERT-family checkpoints (BERT, RoBERTa, MiniLM, sentence-transformers dirs).

A HF dir holds config.json + model.safetensors + tokenizer.json (WordPiece or BPE with its
normaliser and [CLS]/[SEP] post-processor). sentence-transformers dirs add modules.json,
1_Pooling/config.json and sentence_bert_config.json (max_seq_length), which we honour so
embeddings match theirs: same pooling, same normalisation, same truncation.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

from llmkit.errors import LlmkitError
from llmkit.model.encoder import Encoder, EncoderConfig
from llmkit.utils import read_json

SUPPORTED_TYPES = ("bert", "roberta")
_PREFIXES = ("bert.", "roberta.")

# HF name (after the bert./roberta. prefix) -> llmkit name; {i} is the layer index.
_LAYER_MAP = {
    "attention.output.dense": "attn.proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.fc",
    "output.dense": "mlp.proj",
    "output.LayerNorm": "mlp_norm",
}
_TOP_MAP = {
    "embeddings.word_embeddings": "embed",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.token_type_embeddings": "type_embed",
    "embeddings.LayerNorm": "embed_norm",
    # masked-LM heads: BertForMaskedLM ("cls.predictions") and RobertaForMaskedLM ("lm_head")
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
    "lm_head.dense": "mlm.dense",
    "lm_head.layer_norm": "mlm.norm",
    # next-sentence prediction (BertForPreTraining): the pooler and the 2-way classifier
    "pooler.dense": "nsp.pooler",
    "cls.seq_relationship": "nsp.classifier",
}
_MLM_BIAS = ("cls.predictions.bias", "lm_head.bias")
# Buffers, and decoder weights (tied to embed); the pooler and NSP weights are kept only with NSP (load_hf_encoder).
_IGNORED = re.compile(r"(^embeddings\.position_ids$|decoder\.(weight|bias)$)")


def is_hf_encoder_dir(path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    meta = read_json(cfg)
    return "arch" not in meta and "model_type" in meta


def config_from_hf(hf: dict, pooling: str = "mean", normalize: bool = True) -> EncoderConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise LlmkitError(f"unsupported encoder model_type {model_type!r} (supported: {', '.join(SUPPORTED_TYPES)})")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise LlmkitError(f"unsupported hidden_act {hf['hidden_act']!r}: llmkit encoders use exact GELU")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LlmkitError(f"unsupported position_embedding_type {hf['position_embedding_type']!r}")
    pad = hf.get("pad_token_id", 0) or 0
    return EncoderConfig(
        vocab_size=hf["vocab_size"], max_position=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2), n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("layer_norm_eps", 1e-12),
        dropout=hf.get("hidden_dropout_prob", 0.1), pad_token_id=pad, pooling=pooling, normalize=normalize,
        # RoBERTa counts positions from padding_idx + 1 (right-padded inputs: arange + pad + 1)
        position_offset=pad + 1 if model_type == "roberta" else 0,
        init_std=hf.get("initializer_range", 0.02))


def convert_state_dict(state: dict[str, torch.Tensor], n_layer: int, nsp: bool = False) -> dict[str, torch.Tensor]:
    """Rename HF BERT/RoBERTa weights (with or without the `bert.` prefix) to llmkit's Encoder names;
    the pooler and next-sentence weights are kept (as nsp.*) only when `nsp`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        # TF-era checkpoints call LayerNorm parameters gamma/beta
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        if _IGNORED.search(name) or (not nsp and name.startswith(("pooler.", "cls.seq_relationship."))):
            continue
        if name in _MLM_BIAS:
            out["mlm.bias"] = tensor
            continue
        module, _, param = name.rpartition(".")
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
        if m:
            i, sub = int(m.group(1)), m.group(2)
            if i >= n_layer:
                raise LlmkitError(f"weight {name} is for layer {i}, but the config has {n_layer} layers")
            if sub in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv.setdefault(i, {})[f"{sub.rsplit('.', 1)[1]}.{param}"] = tensor
                continue
            if sub in _LAYER_MAP:
                out[f"blocks.{i}.{_LAYER_MAP[sub]}.{param}"] = tensor
                continue
        elif module in _TOP_MAP:
            out[f"{_TOP_MAP[module]}.{param}"] = tensor
            continue
        raise LlmkitError(f"unexpected weight {name!r} in a BERT-family checkpoint")
    for i, parts in qkv.items():
        for param in ("weight", "bias"):
            try:  # fused projection: rows ordered q, then k, then v
                out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[f"{p}.{param}"] for p in ("query", "key", "value")])
            except KeyError as e:
                raise LlmkitError(f"layer {i} is missing attention weight {e.args[0]}") from None
    return out


def _encoder_for(config: EncoderConfig, state: dict) -> Encoder:
    """MLM + NSP when the checkpoint has both heads (BertForPreTraining), else MLM or a bare encoder; weights of
    a head the model does not build (a pooler without NSP) are dropped from `state`."""
    if "mlm.dense.weight" in state and "nsp.classifier.weight" in state:
        from llmkit.model.heads import PretrainingEncoder

        return PretrainingEncoder(config)
    for name in [k for k in state if k.startswith("nsp.")]:
        del state[name]
    return Encoder(config, task="mlm" if "mlm.dense.weight" in state else None)


def sentence_transformers_settings(path: Path) -> dict:
    """Pooling, normalisation, max_seq_length and lower-casing from a sentence-transformers dir (if it is one)."""
    settings = {"pooling": "mean", "normalize": True, "max_seq_length": None, "do_lower_case": False}
    if not (path / "modules.json").is_file():
        return settings
    modules = read_json(path / "modules.json")
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    extra = sorted(set(types) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise LlmkitError(f"{path}/modules.json uses modules llmkit cannot run: {', '.join(extra)}")
    settings["normalize"] = "Normalize" in types
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            pool = read_json(path / m["path"] / "config.json")
            modes = [k for k, v in pool.items() if k.startswith("pooling_mode") and v]
            if modes == ["pooling_mode_mean_tokens"]:
                settings["pooling"] = "mean"
            elif modes == ["pooling_mode_cls_token"]:
                settings["pooling"] = "cls"
            else:
                raise LlmkitError(f"{path}/{m['path']}: unsupported pooling {modes} (mean or cls only)")
    if (path / "sentence_bert_config.json").is_file():
        sb = read_json(path / "sentence_bert_config.json")
        settings["max_seq_length"] = sb.get("max_seq_length")
        settings["do_lower_case"] = bool(sb.get("do_lower_case", False))
    return settings


def load_hf_tokenizer(path: Path, max_length: int, lowercase: bool = False) -> HFTokenizer:
    """tokenizer.json with truncation at `max_length` (counting [CLS]/[SEP]) and no padding."""
    try:
        tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception for missing or malformed files
        raise LlmkitError(f"cannot read tokenizer {path / 'tokenizer.json'}: {e}") from None
    if lowercase:  # sentence-transformers' do_lower_case lowercases before the tokenizer sees the text
        tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer else []))
    tok.enable_truncation(max_length)
    tok.no_padding()  # we pad each batch ourselves, to its own longest sequence
    return tok


def load_hf_encoder(path) -> tuple[Encoder, HFTokenizer]:
    """Build an Encoder (with an MLM head if the checkpoint has one) and its tokenizer from a HF dir."""
    path = Path(path)
    st = sentence_transformers_settings(path)
    config = config_from_hf(read_json(path / "config.json"), st["pooling"], st["normalize"])
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LlmkitError(f"{path} has no model.safetensors (llmkit imports safetensors weights only)")
    try:
        state = convert_state_dict(load_file(str(weights)), config.n_layer, nsp=True)
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmkitError(f"corrupt weights file {weights}: {e}") from None
    model = _encoder_for(config, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise LlmkitError(f"{weights} lacks weights for {missing[:3]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise LlmkitError(f"{weights}: {name} has shape {tuple(tensor.shape)}, "
                              f"config.json implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    # sentence-transformers: max_seq_length, capped by the position table; plain HF: the tokenizer's limit
    limit = st["max_seq_length"]
    if limit is None and (path / "tokenizer_config.json").is_file():
        limit = read_json(path / "tokenizer_config.json").get("model_max_length")
    limit = min(int(limit), config.max_length) if isinstance(limit, (int, float)) and limit < 1e6 else config.max_length
    return model.eval(), load_hf_tokenizer(path, limit, st["do_lower_case"])
