"""Hugging Face import/export against `transformers` itself: tiny random models, equal logits."""
import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from llmkit.model.config import ModelConfig, preset  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.io.hf import load_hf, save_hf  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.io.resolve import convert, resolve_model  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

VOCAB = 320
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, vocab_size=VOCAB)
HF_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            bos_token_id=0, eos_token_id=1),
    "gpt2-erf": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                activation_function="gelu"),
    "llama-gqa": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rope_theta=50000.0),
    "llama-tied": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
    "llama-bias": lambda: transformers.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "llama-head-dim": lambda: transformers.LlamaConfig(**SMALL, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
}


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["the quick brown fox jumps over the lazy dog, 12 times!"] * 10
    tok = Tokenizer.train_bpe(texts, vocab_size=300)
    return Tokenizer.from_hf(tok.hf, tok.bos_token, tok.eos_token, tok.pad_token, chat_template=TEMPLATE)


def random_hf_model(name, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]()).eval()
    with torch.no_grad():  # init leaves norms at 1 and biases at 0: perturb so their mapping is tested
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def logits_hf(model, ids):
    with torch.no_grad():
        return model(ids).logits


def logits_ours(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_import_matches_transformers_and_exports_back(name, tokenizer, tmp_path):
    ref = random_hf_model(name)
    ref.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model, tok = load_hf(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(1))
    expected = logits_hf(ref, ids)
    assert torch.allclose(logits_ours(model, ids), expected, atol=1e-4, rtol=0)
    assert tok.encode("the lazy fox") == tokenizer.encode("the lazy fox")

    save_hf(model, tok, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(ref)
    assert torch.allclose(logits_hf(again, ids), expected, atol=1e-4, rtol=0)


def test_sharded_checkpoint(tmp_path, tokenizer):
    ref = random_hf_model("llama-gqa")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokenizer.save(tmp_path)
    model, _ = resolve_model(tmp_path)
    ids = torch.arange(10)[None]
    assert torch.allclose(logits_ours(model, ids), logits_hf(ref, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [
    preset("char-tiny", vocab_size=VOCAB),                        # GPT-2 layout without biases
    ModelConfig(vocab_size=VOCAB, block_size=32, n_layer=2, n_head=2, n_embd=32, tie_embeddings=False),
    preset("llama-tiny", vocab_size=VOCAB, n_embd=64, n_layer=2),
    preset("llama-tiny", vocab_size=VOCAB, n_embd=64, n_layer=2, qkv_bias=True, tie_embeddings=True),
], ids=["gpt2-nobias", "gpt2-untied", "llama", "qwen2"])
def test_llmkit_model_exports_to_transformers(config, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ours", model, tokenizer)
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(logits_hf(hf, ids), logits_ours(model, ids), atol=1e-4, rtol=0)
    # the tokenizer and chat template survive the trip into transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("jumps over", add_special_tokens=False)["input_ids"] == tokenizer.encode("jumps over")
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages)
    # and back into llmkit
    convert(tmp_path / "hf", tmp_path / "again", to="llmkit")
    again, tok = load_checkpoint(tmp_path / "again")
    assert torch.allclose(logits_ours(again, ids), logits_ours(model, ids), atol=1e-5, rtol=0)
    assert tok.chat_template == TEMPLATE


def test_unexportable_config_is_rejected_before_writing(tmp_path, tokenizer):
    model = GPT(preset("transformer-tiny", vocab_size=VOCAB, n_layer=1))
    with pytest.raises(LlmkitError, match="no architecture matches pos=sinusoidal"):
        save_hf(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def hf_dir(tmp_path, tokenizer):
    random_hf_model("llama-gqa").save_pretrained(tmp_path / "m")
    tokenizer.save(tmp_path / "m")
    return tmp_path / "m"


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_truncated_safetensors(hf_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(LlmkitError, match="corrupt or truncated safetensors file .*model.safetensors"):
        load_hf(hf_dir)


def test_unsupported_architecture(hf_dir):
    edit_config(hf_dir, model_type="mamba")
    with pytest.raises(LlmkitError, match="config.json: unsupported architecture 'mamba'"):
        load_hf(hf_dir)


def test_unsupported_rope_scaling(hf_dir):
    edit_config(hf_dir, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
    with pytest.raises(LlmkitError, match="RoPE scaling 'llama3'"):
        load_hf(hf_dir)


def test_weights_do_not_match_config(hf_dir):
    edit_config(hf_dir, intermediate_size=64)
    with pytest.raises(LlmkitError, match="weights do not match the config: blocks.0.mlp.gate_up.weight"):
        load_hf(hf_dir)
    edit_config(hf_dir, intermediate_size=48, num_hidden_layers=1)
    with pytest.raises(LlmkitError, match="unexpected tensors .*model.layers.1"):
        load_hf(hf_dir)


def test_missing_tokenizer(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    with pytest.raises(LlmkitError, match="missing tokenizer .*tokenizer.json"):
        load_hf(hf_dir)


def test_cli_convert_reports_bad_input_in_one_line(hf_dir, tmp_path):
    (hf_dir / "model.safetensors").write_bytes(b"\x00" * 10)
    cmd = [sys.executable, "-m", "llmkit.cli", "convert", str(hf_dir), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.safetensors" in lines[0]


def test_resolve_model_errors(tmp_path, hf_dir):
    with pytest.raises(LlmkitError, match="no such model 'no-such-model': not a path, and not a known name"):
        resolve_model("no-such-model")
    with pytest.raises(LlmkitError, match="is not a model directory"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 8)
    with pytest.raises(LlmkitError, match="weights.bin is not a GGUF file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(LlmkitError, match="unknown target format 'onnx'"):
        convert(hf_dir, tmp_path / "out", to="onnx")
    with pytest.raises(LlmkitError, match="the destination is the source"):
        convert(hf_dir, hf_dir, to="hf")
