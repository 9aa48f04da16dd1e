"""Hugging Face Marian, BART and T5 directories in and out of llmkit's Seq2Seq.

Each family is a Seq2SeqConfig recipe plus a table of weight names: ours <- theirs. Marian and BART
share a layout ("model.encoder.layers.N.self_attn.q_proj", ...), T5 has its own
("encoder.block.N.layer.0.SelfAttention.q", ...). Tokenizers come from tokenizer.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmkit.errors import LlmkitError
from llmkit.model.seq2seq import Seq2Seq, Seq2SeqConfig
from llmkit.utils import atomic_open, atomic_path, read_json

FAMILIES = ("marian", "bart", "t5")
_ACT_IN = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_new": "gelu_new"}


def family_of(config: Seq2SeqConfig) -> str:
    """Which HF architecture reproduces this config exactly (LlmkitError if none)."""
    c = config
    post_norm = not c.prenorm and not c.final_norm and c.norm == "layernorm" and c.bias and not c.gated
    plain = c.tie_embeddings and c.scale_attention and not c.scale_logits and c.norm_eps == 1e-5
    if post_norm and plain and c.pos == "sinusoidal" and c.sinusoid_halves and not c.embed_norm:
        return "marian"
    if post_norm and plain and c.pos == "learned" and c.pos_offset == 2 and c.embed_norm and c.activation != "gelu_new":
        return "bart"
    if (c.pos == "relative" and c.prenorm and c.final_norm and c.norm == "rmsnorm" and not c.bias
            and not c.scale_attention and not c.embed_norm and not c.scale_embedding and not c.logits_bias
            and c.activation in ("relu", "gelu_new")):
        return "t5"
    raise LlmkitError("no Hugging Face architecture matches this seq2seq config (Marian: post-norm, sinusoid "
                      "halves; BART: learned positions offset 2 + embedding norm; T5: relative, pre-norm RMSNorm)")


def config_from_hf(hf: dict) -> Seq2SeqConfig:
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise LlmkitError(f"model_type {kind!r} is not a seq2seq family llmkit reads ({', '.join(FAMILIES)})")
    ids = dict(pad_id=hf.get("pad_token_id") or 0, eos_id=hf.get("eos_token_id") or 0,
               decoder_start_id=hf.get("decoder_start_token_id") or 0, vocab_size=hf["vocab_size"])
    if kind == "t5":
        act = hf.get("feed_forward_proj", "relu")
        gated = act.startswith("gated-")
        tied = hf.get("tie_word_embeddings", True)
        # transformers 5 keeps the output scaling as its own flag (T5 v1.1: tied weights, no scaling)
        scaled = hf.get("scale_decoder_outputs", tied)
        return Seq2SeqConfig(**ids, block_size=hf.get("n_positions", 512), n_layer=hf["num_layers"],
                             n_dec_layer=hf.get("num_decoder_layers") or hf["num_layers"], n_head=hf["num_heads"],
                             n_embd=hf["d_model"], head_dim=hf["d_kv"], intermediate_size=hf["d_ff"],
                             dropout=hf.get("dropout_rate", 0.1), bias=False, norm="rmsnorm",
                             norm_eps=hf.get("layer_norm_epsilon", 1e-6), prenorm=True, final_norm=True,
                             activation="gelu_new" if act == "gated-gelu" else act.split("-")[-1], gated=gated,
                             pos="relative", relative_buckets=hf.get("relative_attention_num_buckets", 32),
                             relative_max_distance=hf.get("relative_attention_max_distance", 128),
                             scale_embedding=False, scale_attention=False, tie_embeddings=tied, scale_logits=scaled)
    act = hf.get("activation_function", "gelu")
    if act not in _ACT_IN or hf.get("encoder_attention_heads") != hf.get("decoder_attention_heads") \
            or hf.get("encoder_ffn_dim") != hf.get("decoder_ffn_dim") or hf.get("normalize_before") \
            or not hf.get("share_encoder_decoder_embeddings", True) or hf.get("add_final_layer_norm"):
        raise LlmkitError(f"unsupported {kind} variant: activation {act!r}, or different encoder/decoder widths, "
                          "unshared embeddings or pre-norm")
    common = dict(**ids, block_size=hf["max_position_embeddings"], n_layer=hf["encoder_layers"],
                  n_dec_layer=hf["decoder_layers"], n_head=hf["encoder_attention_heads"], n_embd=hf["d_model"],
                  intermediate_size=hf["encoder_ffn_dim"], dropout=hf.get("dropout", 0.1), activation=_ACT_IN[act],
                  scale_embedding=bool(hf.get("scale_embedding", False)), logits_bias=True,
                  tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind == "marian":
        return Seq2SeqConfig(**common, pos="sinusoidal", sinusoid_halves=True)
    return Seq2SeqConfig(**common, pos="learned", pos_offset=2, embed_norm=True)


def _names(config: Seq2SeqConfig, kind: str) -> dict[str, str]:
    """ours -> theirs for every weight of the model."""
    names = {"embed.weight": "shared.weight" if kind == "t5" else "model.shared.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    if kind == "t5":
        names.update({"enc_rel.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "dec_rel.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      "enc_norm.weight": "encoder.final_layer_norm.weight",
                      "dec_norm.weight": "decoder.final_layer_norm.weight"})
        for side, n in (("encoder", config.n_layer), ("decoder", config.n_dec_layer)):
            for i in range(n):
                names.update(_t5_layer(config, side, i))
        return names
    names["final_logits_bias"] = "final_logits_bias"
    for side, n in (("encoder", config.n_layer), ("decoder", config.n_dec_layer)):
        short = side[:3]
        if kind == "bart":
            names[f"{short}_pos.weight"] = f"model.{side}.embed_positions.weight"
            for p in ("weight", "bias"):
                names[f"{short}_embed_norm.{p}"] = f"model.{side}.layernorm_embedding.{p}"
        for i in range(n):
            names.update(_bart_layer(side, i))
    return names


def _bart_layer(side: str, i: int) -> dict[str, str]:
    ours, theirs = f"{side}.{i}.", f"model.{side}.layers.{i}."
    pairs = {"self_attn.q": "self_attn.q_proj", "self_attn.k": "self_attn.k_proj", "self_attn.v": "self_attn.v_proj",
             "self_attn.o": "self_attn.out_proj", "self_norm": "self_attn_layer_norm", "mlp.fc": "fc1",
             "mlp.proj": "fc2", "mlp_norm": "final_layer_norm"}
    if side == "decoder":
        pairs.update({"cross_attn.q": "encoder_attn.q_proj", "cross_attn.k": "encoder_attn.k_proj",
                      "cross_attn.v": "encoder_attn.v_proj", "cross_attn.o": "encoder_attn.out_proj",
                      "cross_norm": "encoder_attn_layer_norm"})
    return {f"{ours}{a}.{p}": f"{theirs}{b}.{p}" for a, b in pairs.items() for p in ("weight", "bias")}


def _t5_layer(config: Seq2SeqConfig, side: str, i: int) -> dict[str, str]:
    ours, theirs = f"{side}.{i}.", f"{side}.block.{i}.layer."
    ff = "2" if side == "decoder" else "1"
    pairs = {f"self_attn.{x}": f"0.SelfAttention.{x}" for x in "qkvo"}
    pairs["self_norm"] = "0.layer_norm"
    if side == "decoder":
        pairs.update({f"cross_attn.{x}": f"1.EncDecAttention.{x}" for x in "qkvo"})
        pairs["cross_norm"] = "1.layer_norm"
    if config.gated:
        pairs.update({"mlp.fc": f"{ff}.DenseReluDense.wi_0", "mlp.gate": f"{ff}.DenseReluDense.wi_1"})
    else:
        pairs["mlp.fc"] = f"{ff}.DenseReluDense.wi"
    pairs.update({"mlp.proj": f"{ff}.DenseReluDense.wo", "mlp_norm": f"{ff}.layer_norm"})
    return {f"{ours}{a}.weight": f"{theirs}{b}.weight" for a, b in pairs.items()}


# tied copies and fixed tables a checkpoint may hold besides the weights we map
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "embed_positions.weight", "lm_head.weight")


def load_hf_seq2seq(model_dir, device="cpu"):
    """(Seq2Seq, tokenizer) from a Hugging Face Marian, BART or T5 directory."""
    from llmkit.io.hf import load_hf_tokenizer, read_safetensors

    model_dir = Path(model_dir)
    hf = read_json(model_dir / "config.json")
    try:
        config = config_from_hf(hf)
    except KeyError as e:
        raise LlmkitError(f"{model_dir / 'config.json'}: missing key {e}") from None
    tensors = read_safetensors(model_dir)
    names = _names(config, hf["model_type"])
    missing = sorted(theirs for theirs in names.values() if theirs not in tensors)
    left = sorted(k for k in set(tensors) - set(names.values()) if not k.endswith(_IGNORED))
    if missing or left:
        raise LlmkitError(f"{model_dir}: weights do not match the config: missing {missing[:3]}, unexpected {left[:3]}")
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    if config.logits_bias:
        state["final_logits_bias"] = state["final_logits_bias"].reshape(-1)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model = Seq2Seq(config)
    model.load_state_dict(state, strict=True)
    tokenizer = load_hf_tokenizer(model_dir, hf)
    return model.to(device).eval(), tokenizer


def hf_config_dict(config: Seq2SeqConfig) -> dict:
    kind = family_of(config)
    ids = dict(vocab_size=config.vocab_size, pad_token_id=config.pad_id, eos_token_id=config.eos_id,
               decoder_start_token_id=config.decoder_start_id, tie_word_embeddings=config.tie_embeddings,
               is_encoder_decoder=True)
    if kind == "t5":
        act = ("gated-" if config.gated else "") + ("gelu" if config.activation == "gelu_new" else config.activation)
        return dict(model_type="t5", architectures=["T5ForConditionalGeneration"], **ids, d_model=config.n_embd,
                    d_kv=config.head_dim, d_ff=config.intermediate_size, num_layers=config.n_layer,
                    num_decoder_layers=config.n_dec_layer, num_heads=config.n_head, feed_forward_proj=act,
                    relative_attention_num_buckets=config.relative_buckets, dropout_rate=config.dropout,
                    relative_attention_max_distance=config.relative_max_distance,
                    layer_norm_epsilon=config.norm_eps, n_positions=config.block_size,
                    scale_decoder_outputs=config.scale_logits)
    act = {"silu": "swish"}.get(config.activation, config.activation)
    arch = "MarianMTModel" if kind == "marian" else "BartForConditionalGeneration"
    return dict(model_type=kind, architectures=[arch], **ids, d_model=config.n_embd, encoder_layers=config.n_layer,
                decoder_layers=config.n_dec_layer, encoder_attention_heads=config.n_head,
                decoder_attention_heads=config.n_head, encoder_ffn_dim=config.intermediate_size,
                decoder_ffn_dim=config.intermediate_size, activation_function=act, dropout=config.dropout,
                max_position_embeddings=config.block_size, scale_embedding=config.scale_embedding,
                forced_eos_token_id=None, share_encoder_decoder_embeddings=True)


def save_hf_seq2seq(model: Seq2Seq, tokenizer, out_dir) -> Path:
    """Write a Hugging Face Marian/BART/T5 directory that transformers loads as the same model."""
    out_dir = Path(out_dir)
    config = hf_config_dict(model.config)       # raises before anything is written
    own = model.state_dict()
    own.setdefault("final_logits_bias", torch.zeros(model.config.vocab_size))  # Marian/BART always carry one
    tensors = {theirs: own[ours].detach().contiguous() for ours, theirs in _names(model.config, config["model_type"]).items()}
    if "final_logits_bias" in tensors:
        tensors["final_logits_bias"] = tensors["final_logits_bias"].reshape(1, -1)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_open(out_dir / "config.json") as f:
        json.dump(config, f, indent=2)
    gen = {k: config[k] for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id")}
    with atomic_open(out_dir / "generation_config.json") as f:
        json.dump(gen, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(out_dir)
    return out_dir
