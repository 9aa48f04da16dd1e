"""Export llmkit encoders as Hugging Face BERT checkpoints (config.json + model.safetensors + tokenizer.json).

The inverse of the import in llmkit/io/bert.py: names go back to `bert.*` / `cls.*`, the fused q/k/v
projection is split again, and the heads the model has are kept: masked LM (BertForMaskedLM), masked LM
plus next-sentence prediction (BertForPreTraining), or none (BertModel).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmkit.errors import LlmkitError
from llmkit.utils import atomic_open, atomic_path

_LAYER = {"attn.proj": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
          "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense", "mlp_norm": "output.LayerNorm"}
_TOP = {"embed": "bert.embeddings.word_embeddings", "pos_embed": "bert.embeddings.position_embeddings",
        "type_embed": "bert.embeddings.token_type_embeddings", "embed_norm": "bert.embeddings.LayerNorm",
        "mlm.dense": "cls.predictions.transform.dense", "mlm.norm": "cls.predictions.transform.LayerNorm",
        "nsp.pooler": "bert.pooler.dense", "nsp.classifier": "cls.seq_relationship"}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under BertForPreTraining / BertForMaskedLM / BertModel names."""
    out = {}
    for name, tensor in model.state_dict().items():
        module, _, param = name.rpartition(".")
        if name == "mlm.bias":
            out["cls.predictions.bias"] = tensor
        elif module in _TOP:
            out[f"{_TOP[module]}.{param}"] = tensor
        elif module.startswith("blocks."):
            _, i, sub = module.split(".", 2)
            prefix = f"bert.encoder.layer.{i}"
            if sub == "attn.qkv":
                for part, chunk in zip(("query", "key", "value"), tensor.chunk(3)):
                    out[f"{prefix}.attention.self.{part}.{param}"] = chunk
            else:
                out[f"{prefix}.{_LAYER[sub]}.{param}"] = tensor
        else:
            raise LlmkitError(f"weight {name!r} has no BERT counterpart (task heads are llmkit-only)")
    if "cls.predictions.bias" in out:  # HF ties the decoder to the word embeddings; it still lists both
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def hf_config(model) -> dict:
    c = model.config
    if c.position_offset:
        raise LlmkitError("only BERT-style encoders export to Hugging Face (this one numbers positions as RoBERTa)")
    arch = {"mlm+nsp": "BertForPreTraining", "mlm": "BertForMaskedLM"}.get(model.task, "BertModel")
    if model.task not in (None, "mlm", "mlm+nsp"):
        raise LlmkitError(f"a {model.task!r} encoder does not export to Hugging Face (its heads are llmkit's own)")
    return {"architectures": [arch], "model_type": "bert", "vocab_size": c.vocab_size, "hidden_size": c.n_embd,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "intermediate_size": c.intermediate_size,
            "hidden_act": "gelu", "hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout,
            "max_position_embeddings": c.max_position, "type_vocab_size": c.type_vocab_size,
            "initializer_range": c.init_std, "layer_norm_eps": c.norm_eps, "pad_token_id": c.pad_token_id,
            "position_embedding_type": "absolute", "tie_word_embeddings": True}


def save_hf_bert(model, tokenizer, out_dir) -> Path:
    out = Path(out_dir)
    config, state = hf_config(model), hf_state_dict(model)
    state.pop("cls.predictions.decoder.weight", None)  # tied: safetensors stores each tensor once
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(out / "tokenizer.json")
    with atomic_open(out / "config.json") as f:
        json.dump(config, f, indent=2)
    return out
