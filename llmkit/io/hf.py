"""Hugging Face checkpoint directories <-> llmkit models.

Import reads `config.json`, `model.safetensors` (or a sharded `model.safetensors.index.json`) and
`tokenizer.json` (+ `tokenizer_config.json` / `chat_template.jinja` / `generation_config.json` for the
chat template and special ids) for GPT-2 and Llama-family models (Llama, SmolLM, TinyLlama, Mistral,
Qwen2). Export writes a directory `transformers` loads with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmkit.model.config import ModelConfig
from llmkit.errors import LlmkitError
from llmkit.io.common import build_model, fuse_llama_layer, split_llama_layer
from llmkit.utils import atomic_open, atomic_path, read_json

LLAMA_TYPES = ("llama", "mistral", "qwen2")
# HF GPT-2 activation names -> llmkit mlp (the three tanh forms agree to float rounding)
GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_erf"}
# llmkit mlp -> the HF GPT-2 activation it exports as (the MLPs a GPT-2 export can carry)
_GPT2_EXPORT_ACTIVATIONS = {"gelu": "gelu_new", "gelu_erf": "gelu"}
# llmkit name -> GPT-2 name, per block
_GPT2_NORMS = (("attn_norm", "ln_1"), ("mlp_norm", "ln_2"))
_GPT2_LINEARS = (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                 ("mlp.proj", "mlp.c_proj"))


def config_from_hf(hf: dict, source) -> ModelConfig:
    """llmkit ModelConfig for an HF config.json dict; unsupported variants raise LlmkitError."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS or not hf.get("scale_attn_weights", True) \
                or hf.get("scale_attn_by_inverse_layer_idx"):
            raise LlmkitError(f"{source}: unsupported GPT-2 variant (activation {act!r} or attention scaling)")
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"], bias=True,
                           norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=GPT2_ACTIVATIONS[act],
                           pos="learned", tie_embeddings=hf.get("tie_word_embeddings", True))
    if kind not in LLAMA_TYPES:
        raise LlmkitError(f"{source}: unsupported architecture {kind!r} "
                          f"(supported: gpt2, {', '.join(LLAMA_TYPES)})")
    if hf.get("hidden_act", "silu") != "silu":
        raise LlmkitError(f"{source}: unsupported activation {hf['hidden_act']!r} (silu)")
    # transformers 5 writes rope_parameters, older versions rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise LlmkitError(f"{source}: RoPE scaling {rope_type!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if kind == "qwen2":
        attn_bias, qkv_bias = False, True
    else:
        qkv_bias = attn_bias
    if attn_bias != mlp_bias:
        raise LlmkitError(f"{source}: attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported")
    block_size = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if (kind == "mistral" or hf.get("use_sliding_window")) else None
    if window:  # full attention equals sliding-window attention as long as contexts fit in the window
        block_size = min(block_size, window)
    n_head = hf["num_attention_heads"]
    return ModelConfig(vocab_size=hf["vocab_size"], block_size=block_size, n_layer=hf["num_hidden_layers"],
                       n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                       n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                       intermediate_size=hf["intermediate_size"], bias=attn_bias, qkv_bias=qkv_bias,
                       norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", pos="rope",
                       rope_theta=float(theta), tie_embeddings=hf.get("tie_word_embeddings", False))


def _index_shards(index: Path, model_dir: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's index, each a plain file inside `model_dir`:
    an index could otherwise point the loader at any file on the machine (/etc/..., ../../...)."""
    weight_map = read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise LlmkitError(f"{index}: \"weight_map\" must be a non-empty mapping of tensor names to shard files")
    shards = set(weight_map.values())
    for shard in shards:
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts \
                or (model_dir / shard).resolve().parent != model_dir.resolve():
            raise LlmkitError(f"{index}: shard {shard!r} is not a file name inside {model_dir}")
    return sorted(shards)


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = _index_shards(index, model_dir)
    elif (model_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise LlmkitError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for shard in shards:
        path = model_dir / shard
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except FileNotFoundError:
            raise LlmkitError(f"missing weights shard {path}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LlmkitError(f"corrupt or truncated safetensors file {path}: {e}") from None
    return tensors


class _Source:
    """Hands out tensors by HF name, remembering which were used so leftovers can be reported."""

    def __init__(self, tensors: dict, origin):
        self.tensors, self.origin, self.used = tensors, origin, set()

    def __call__(self, key, optional=False):
        if key not in self.tensors:
            if optional:
                return None
            raise LlmkitError(f"{self.origin}: weights do not match the config: tensor {key} is missing")
        self.used.add(key)
        return self.tensors[key]

    def check_all_used(self, ignore=("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")):
        left = sorted(k for k in set(self.tensors) - self.used if not k.endswith(ignore))
        if left:
            raise LlmkitError(f"{self.origin}: weights do not match the config: unexpected tensors {left[:3]}")


def _gpt2_state(source: _Source, config: ModelConfig) -> dict[str, torch.Tensor]:
    # GPT2LMHeadModel saves under "transformer.", the original GPT2Model checkpoints without it.
    prefix = "transformer." if "transformer.wte.weight" in source.tensors else ""

    def get(name):
        return source(prefix + name)

    # GPT-2 uses Conv1D layers, whose weights are stored (in, out): transpose to Linear's (out, in).
    state = {"embed.weight": get("wte.weight"), "pos_embed.weight": get("wpe.weight"),
             "final_norm.weight": get("ln_f.weight"), "final_norm.bias": get("ln_f.bias")}
    for i in range(config.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in _GPT2_NORMS:
            state[b + ours + ".weight"], state[b + ours + ".bias"] = get(h + theirs + ".weight"), get(h + theirs + ".bias")
        for ours, theirs in _GPT2_LINEARS:
            state[b + ours + ".weight"] = get(h + theirs + ".weight").t()
            state[b + ours + ".bias"] = get(h + theirs + ".bias")
    return state


def _llama_state(get: _Source, config: ModelConfig) -> dict[str, torch.Tensor]:
    state = {"embed.weight": get("model.embed_tokens.weight"), "final_norm.weight": get("model.norm.weight")}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        state.update(fuse_llama_layer(
            i, norm1=get(p + "input_layernorm.weight"), norm2=get(p + "post_attention_layernorm.weight"),
            q=get(a + "q_proj.weight"), k=get(a + "k_proj.weight"), v=get(a + "v_proj.weight"),
            q_bias=get(a + "q_proj.bias", optional=True), k_bias=get(a + "k_proj.bias", optional=True),
            v_bias=get(a + "v_proj.bias", optional=True), o=get(a + "o_proj.weight"),
            gate=get(m + "gate_proj.weight"), up=get(m + "up_proj.weight"), down=get(m + "down_proj.weight")))
        if config.bias:  # Llama attention_bias + mlp_bias: o_proj and the MLP carry biases too
            state[f"blocks.{i}.attn.proj.bias"] = get(a + "o_proj.bias")
            state[f"blocks.{i}.mlp.gate_up.bias"] = torch.cat([get(m + "gate_proj.bias"), get(m + "up_proj.bias")])
            state[f"blocks.{i}.mlp.proj.bias"] = get(m + "down_proj.bias")
    return state


def load_hf_tokenizer(model_dir: Path, hf_config: dict):
    """llmkit Tokenizer from tokenizer.json (+ tokenizer_config.json), or Marian's source.spm + vocab.json,
    with generation_config's stop ids."""
    from llmkit.tokenizer import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists() and (model_dir / "source.spm").exists():  # Marian's SentencePiece models
        from llmkit.io.spm import marian_tokenizer
        tok = marian_tokenizer(model_dir)
    elif not path.exists():
        raise LlmkitError(f"missing tokenizer {path}")
    else:
        tok = Tokenizer.load(path)
    gen_cfg = read_json(model_dir / "generation_config.json", required=False)
    stops = gen_cfg.get("eos_token_id", hf_config.get("eos_token_id"))
    stops = [i for i in (stops if isinstance(stops, list) else [stops])
             if isinstance(i, int) and tok.id_to_token(i) is not None]
    eos = tok.eos_token if tok.eos_token is not None else (stops[0] if stops else None)
    return Tokenizer.from_hf(tok.hf, tok.bos_token, eos, tok.pad_token, tok.chat_template,
                             stop_tokens=[*tok.stop_tokens, *(tok.id_to_token(i) for i in stops)])


def load_hf(model_dir, device="cpu"):
    """(model, tokenizer) from a Hugging Face model directory."""
    model_dir = Path(model_dir)
    hf_config = read_json(model_dir / "config.json")
    if hf_config.get("model_type") in ("marian", "bart", "t5"):
        from llmkit.io.hf_seq2seq import load_hf_seq2seq
        return load_hf_seq2seq(model_dir, device)
    try:
        config = config_from_hf(hf_config, model_dir / "config.json")
    except KeyError as e:
        raise LlmkitError(f"{model_dir / 'config.json'}: missing key {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # "hidden_size": "x", heads 0, ...
        raise LlmkitError(f"{model_dir / 'config.json'}: a value has the wrong type or range ({e})") from None
    tokenizer = load_hf_tokenizer(model_dir, hf_config)
    get = _Source(read_safetensors(model_dir), model_dir)
    state = (_gpt2_state if hf_config["model_type"] == "gpt2" else _llama_state)(get, config)
    # Tied checkpoints usually omit lm_head.weight; some writers store the tied copy anyway.
    head = get("lm_head.weight", optional=config.tie_embeddings)
    if not config.tie_embeddings:
        state["lm_head.weight"] = head
    get.check_all_used()
    return build_model(config, state, model_dir).to(device), tokenizer


# -- export -----------------------------------------------------------------------------------

def _family(config: ModelConfig) -> str:
    """Which HF architecture reproduces this llmkit config exactly."""
    layout = (config.pos, config.norm, config.mlp)
    if layout[:2] == ("learned", "layernorm") and config.mlp in _GPT2_EXPORT_ACTIVATIONS \
            and config.n_kv_head == config.n_head \
            and config.head_dim * config.n_head == config.n_embd and config.qkv_bias == config.bias:
        return "gpt2"
    if layout == ("rope", "rmsnorm", "swiglu"):
        if config.qkv_bias and not config.bias:
            return "qwen2"
        if config.qkv_bias == config.bias:
            return "llama"
    raise LlmkitError(f"cannot export to Hugging Face: no architecture matches pos={config.pos}, "
                      f"norm={config.norm}, mlp={config.mlp}, bias={config.bias}, qkv_bias={config.qkv_bias}")


def hf_config_dict(config: ModelConfig, tokenizer=None) -> dict:
    family = _family(config)
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                                        "pad_token_id": tokenizer.pad_id}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.block_size, "n_layer": config.n_layer, "n_head": config.n_head,
                "n_embd": config.n_embd, "n_inner": config.intermediate_size, "activation_function": _GPT2_EXPORT_ACTIVATIONS[config.mlp],
                "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
                "dtype": "float32", **ids}
    return {"architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
            "model_type": family, "vocab_size": config.vocab_size, "max_position_embeddings": config.block_size,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head, "hidden_size": config.n_embd, "head_dim": config.head_dim,
            "intermediate_size": config.intermediate_size, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "attention_bias": config.bias, "mlp_bias": config.bias, "tie_word_embeddings": config.tie_embeddings,
            "attention_dropout": config.dropout, "dtype": "float32", **ids}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under HF names (the inverse of the import mapping)."""
    config = model.config
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {}
    if _family(config) == "gpt2":
        def bias(name, rows):  # HF GPT-2 always has biases; a bias-free llmkit model exports zeros
            return state.get(name, torch.zeros(rows))
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = state["embed.weight"], state["pos_embed.weight"]
        out["transformer.ln_f.weight"] = state["final_norm.weight"]
        out["transformer.ln_f.bias"] = bias("final_norm.bias", config.n_embd)
        for i in range(config.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in _GPT2_NORMS:
                out[h + theirs + ".weight"] = state[b + ours + ".weight"]
                out[h + theirs + ".bias"] = bias(b + ours + ".bias", config.n_embd)
            for ours, theirs in _GPT2_LINEARS:
                weight = state[b + ours + ".weight"]
                out[h + theirs + ".weight"] = weight.t().contiguous()
                out[h + theirs + ".bias"] = bias(b + ours + ".bias", weight.shape[0])
    else:
        out["model.embed_tokens.weight"], out["model.norm.weight"] = state["embed.weight"], state["final_norm.weight"]
        for i in range(config.n_layer):
            parts, a, m = split_llama_layer(state, i, config), f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
            names = {"norm1": f"model.layers.{i}.input_layernorm.weight", "q": a + "q_proj.weight",
                     "norm2": f"model.layers.{i}.post_attention_layernorm.weight", "k": a + "k_proj.weight",
                     "v": a + "v_proj.weight", "o": a + "o_proj.weight", "gate": m + "gate_proj.weight",
                     "up": m + "up_proj.weight", "down": m + "down_proj.weight", "q_bias": a + "q_proj.bias",
                     "k_bias": a + "k_proj.bias", "v_bias": a + "v_proj.bias"}
            out.update({names[k]: v.contiguous() for k, v in parts.items()})
            if config.bias:
                out[a + "o_proj.bias"] = state[f"blocks.{i}.attn.proj.bias"]
                out[m + "gate_proj.bias"], out[m + "up_proj.bias"] = state[f"blocks.{i}.mlp.gate_up.bias"].chunk(2)
                out[m + "down_proj.bias"] = state[f"blocks.{i}.mlp.proj.bias"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf(model, tokenizer, out_dir) -> Path:
    """Write a Hugging Face model directory (config, safetensors, tokenizer files)."""
    out_dir = Path(out_dir)
    config = hf_config_dict(model.config, tokenizer)   # raises before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file(hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    with atomic_open(out_dir / "config.json") as f:
        json.dump(config, f, indent=2)
    if tokenizer is None:
        return out_dir
    tokenizer.save(out_dir)  # tokenizer.json + tokenizer_config.json (specials, chat template)
    gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids) or tokenizer.eos_id}
    with atomic_open(out_dir / "generation_config.json") as f:
        json.dump(gen, f, indent=2)
    return out_dir
