"""Small, deliberately broken inputs for the bad-input tests: model dirs with bad configs, crafted
GGUF headers, HF shard indexes that point outside their directory, weights that are all NaN."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from llmkit.io.checkpoint import save_checkpoint
from llmkit.model.config import ModelConfig
from llmkit.io.common import split_llama_layer
from llmkit.io.hf import save_hf
from llmkit.model.decoder import GPT
from llmkit.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. "
LLAMA = dict(block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, bias=False, norm="rmsnorm",
             mlp="swiglu", pos="rope", tie_embeddings=True)


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe([TEXT] * 4, vocab_size=280)


def tiny_model(tok: Tokenizer, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, **LLAMA)).eval()


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of model dir `src` whose config.json went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(meta)))
    return dst


def nan_model_dir(tok: Tokenizer, path: Path) -> Path:
    model = tiny_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_checkpoint(path, model, tok)


def write_gguf(path: Path, model: GPT, tok: Tokenizer, meta: dict | None = None) -> Path:
    """`model` as a llama GGUF (q/k rows left in llmkit's order: these files test parsing, not numbers).
    `meta` overrides or adds metadata; a value's Python type picks its GGUF type."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    keys = {"llama.context_length": c.block_size, "llama.embedding_length": c.n_embd,
            "llama.block_count": c.n_layer, "llama.feed_forward_length": c.intermediate_size,
            "llama.attention.head_count": c.n_head, "llama.attention.head_count_kv": c.n_kv_head,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0, **(meta or {})}
    for key, value in keys.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    spec = json.loads(tok.hf.to_str())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([tok.id_to_token(i) for i in range(tok.vocab_size)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_id)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    for i in range(c.n_layer):
        parts = split_llama_layer(state, i, c)
        names = {"norm1": "attn_norm", "norm2": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
                 "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
        tensors.update({f"blk.{i}.{names[k]}.weight": v for k, v in parts.items()})
    for name, tensor in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(tensor.numpy(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_dir_with_index(model: GPT, tok: Tokenizer, path: Path, weight_map) -> Path:
    """A Hugging Face export whose weights are described by a shard index holding `weight_map`."""
    save_hf(model, tok, path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def warm_kernels() -> None:
    """Build the CPU decoding kernels now if they are not cached: the first build announces itself on
    stderr, which must not land inside a case that checks stderr is one error line."""
    from llmkit.infer import kernels

    kernels.available()


def workspace(tmp_path_factory, name: str) -> tuple[Path, Tokenizer, GPT]:
    """A fresh folder, the kernels built, and the tiny tokenizer and model the files are made from."""
    root = tmp_path_factory.mktemp(name)
    warm_kernels()
    tok = tiny_tokenizer()
    return root, tok, tiny_model(tok)


def tree(root: Path) -> set[str]:
    """Every path under `root` (files and folders), to show a failed command left nothing behind."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}
