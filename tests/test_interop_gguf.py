"""GGUF import: synthetic files written with the `gguf` package, and the real SmolLM2 file against
transformers' own GGUF loader (greedy continuations and tokenizer ids must agree)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.infer.cpu import optimize_for_inference  # noqa: E402
from llmkit.infer.generate import generate  # noqa: E402
from llmkit.io.gguf import load_gguf  # noqa: E402
from llmkit.io.resolve import convert, embedded_model_path, resolve_model  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog. 你好 🙂"] * 10, vocab_size=300)


@pytest.fixture(scope="module")
def hf_llama(tokenizer):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, rope_theta=50000.0, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def permute_for_llama_cpp(w, n_head):
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (pairwise RoPE layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tokenizer, qtype=Q.F32, arch="llama", meta=None, skip=(), with_tokenizer=True,
               raw=None):
    """Write `model` as llama.cpp would; return {hf_name: the weight as the file stores it, dequantized}."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
            "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
            "rope.dimension_count": c.head_dim, "attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
            "rope.freq_base": float(c.rope_parameters["rope_theta"]), **(meta or {})}
    for key, value in keys.items():
        (w.add_float32 if isinstance(value, float) else w.add_uint32)(f"{arch}.{key}", value)
    if with_tokenizer:
        spec = json.loads(tokenizer.hf.to_str())
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        specials = {t["content"] for t in spec["added_tokens"]}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(merges)
        w.add_token_types([3 if t in specials else 1 for t in tokens])
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    stored = {}
    for hf_name, tensor in model.state_dict().items():
        name = names[hf_name]
        if name in skip:
            continue
        data = tensor.numpy()
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in name else c.num_key_value_heads
            data = permute_for_llama_cpp(data, heads)
        if raw and name in raw:       # raw bytes of a given type, to test unsupported ones
            w.add_tensor(name, raw[name][1], raw_dtype=raw[name][0])
            continue
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, data)
            stored[hf_name] = tensor
            continue
        packed = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, packed, raw_dtype=qtype)
        value = torch.from_numpy(gguf.quants.dequantize(packed, qtype).reshape(data.shape).copy())
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # undo the permutation for the reference
            value = value.reshape(heads, -1, 2, data.shape[1]).transpose(1, 2).reshape(data.shape)
        stored[hf_name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1], ids=lambda q: q.name)
def test_synthetic_gguf_matches_dequantized_reference(qtype, hf_llama, tokenizer, tmp_path):
    stored = write_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, qtype)
    reference = transformers.LlamaForCausalLM(hf_llama.config).eval()
    reference.load_state_dict(stored)
    model, tok = load_gguf(tmp_path / "m.gguf")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], reference(ids).logits, atol=1e-4, rtol=0)
    text = "the lazy dog 你好 🙂!"
    assert tok.encode(text) == tokenizer.encode(text)
    assert tok.chat_template == TEMPLATE and tok.eos_id == tokenizer.eos_id and tok.eos_id in tok.stop_ids


def test_convert_gguf_to_llmkit_and_hf(hf_llama, tokenizer, tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, Q.F32)
    convert(tmp_path / "m.gguf", tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, hf_llama(ids).logits, atol=1e-4, rtol=0)


def test_unsupported_quantization_type(hf_llama, tokenizer, tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    q8_1_rows = np.zeros((64, 64 // block * size), dtype=np.uint8)   # 64 rows of 64 values
    write_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, raw={"blk.0.attn_output.weight": (Q.Q8_1, q8_1_rows)})
    with pytest.raises(LlmkitError, match=r"m.gguf: tensor blk.0.attn_output.weight uses quantization type Q8_1"):
        load_gguf(tmp_path / "m.gguf")


def test_unsupported_architecture(hf_llama, tokenizer, tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, arch="falcon")
    with pytest.raises(LlmkitError, match="m.gguf: unsupported GGUF architecture 'falcon'"):
        load_gguf(tmp_path / "m.gguf")


def test_weights_do_not_match_metadata(hf_llama, tokenizer, tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, meta={"feed_forward_length": 96})
    with pytest.raises(LlmkitError, match="m.gguf: weights do not match the config: blocks.0.mlp.gate_up.weight"):
        load_gguf(tmp_path / "m.gguf")
    write_gguf(tmp_path / "n.gguf", hf_llama, tokenizer, skip={"blk.1.ffn_down.weight"})
    with pytest.raises(LlmkitError, match="n.gguf: tensor blk.1.ffn_down.weight is missing"):
        load_gguf(tmp_path / "n.gguf")


def test_missing_tokenizer(hf_llama, tokenizer, tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_llama, tokenizer, with_tokenizer=False)
    with pytest.raises(LlmkitError, match="m.gguf: no tokenizer in the file"):
        load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("keep", [3, 100_000, -4096])
def test_truncated_or_corrupt_file(keep, tmp_path):
    data = embedded_model_path("smollm2-135m-instruct").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[:keep])
    with pytest.raises(LlmkitError, match=r"bad.gguf"):
        resolve_model(tmp_path / "bad.gguf")


def test_not_a_gguf_file_cli(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + os.urandom(64))
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "convert", str(tmp_path / "junk.gguf"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("error: ") and "junk.gguf" in lines[0]


# -- the real embedded model against transformers' GGUF loader ---------------------------------

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain step by step how photosynthesis works.",
    "请用中文介绍一下长城的历史。",
]
TEXTS = ["Hello, world! How are you today?", "你好，世界！今天天气怎么样？", "emoji 🙂🎉👍🏽 and ünïcödé façade",
         "def f(x):\n    return x ** 2  # code\n\n\ttabs", "Numbers: 3.14159, 2024-11-23, $1,000,000"]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def smollm():
    path = embedded_model_path("smollm2-135m-instruct")
    ours, tok = resolve_model("smollm2-135m-instruct", dtype="float32")  # the import itself, expanded
    optimize_for_inference(ours)  # as `llmkit generate` and `llmkit chat` run it: the CPU kernels included
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, tok, ref, ref_tok


@pytest.mark.slow
def test_smollm2_tokenizer_and_template_match_transformers(smollm):
    _, tok, _, ref_tok = smollm
    for text in TEXTS + PROMPTS:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
    # tokenizer.ggml.pre = "smollm": digits are split off before the GPT-2 regex, as llama.cpp and
    # SmolLM2's own tokenizer.json do (transformers' GGUF converter omits this; it only shows on
    # whitespace before a digit, where it gives 'Ġ', 'Ġ', '1' instead of 'ĠĠ', '1').
    assert tok.encode("x  1") == [tok.token_to_id(t) for t in ("x", "ĠĠ", "1")]
    messages = [{"role": "user", "content": PROMPTS[2]}]
    rendered = tok.apply_chat_template(messages)
    assert rendered == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode(rendered) == ref_tok(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm):
    ours, tok, ref, ref_tok = smollm
    for question in PROMPTS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}])
        ids = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=tok.pad_id)[0, ids.shape[1]:].tolist()
        assert len(out) == NEW_TOKENS, "the reference stopped early; pick a prompt with a longer answer"
        expected = tok.decode(out)
        assert generate(ours, tok, prompt, max_new_tokens=NEW_TOKENS, temperature=0) == expected
