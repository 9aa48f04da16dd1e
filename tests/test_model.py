"""The decoder: KV-cache equivalence, masking, parameter accounting, init, training signal, checkpoints."""
import math
import os

import pytest
import torch

from llmkit.io.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from llmkit.model.config import ModelConfig, preset
from llmkit.errors import LlmkitError
from llmkit.model.decoder import GPT
from llmkit.model.layers import RMSNorm, SinusoidalPositions

STYLES = {
    "gpt2": dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "llama": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
    "sinusoidal": dict(pos="sinusoidal", norm="layernorm", mlp="gelu", bias=False, qkv_bias=True),
}


def tiny(style: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32), **STYLES[style],
                          **overrides})


def make(style: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(style, **overrides)).eval()


@pytest.mark.parametrize("style", STYLES)
def test_kv_cache_matches_full_forward(style):
    model = make(style)
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(idx)
        # prefill then one token at a time
        cache = model.new_cache(2, 24)
        steps = [model(idx[:, :6], cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(6, 20)]
        assert cache.lengths == [20, 20]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
        # chunked prefill: uneven chunks, each attending to the cached ones
        cache = model.new_cache(2)
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 9), (9, 20))]
        torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_rows_of_different_lengths_match_unpadded(style):
    """A right-padded batch told each row's length, then steps with each row at its own position:
    every row gets the logits it has alone."""
    model = make(style)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in (9, 5, 1)]
    idx = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = r
    with torch.no_grad():
        cache = model.new_cache(3, 11)
        last, _ = model(idx, cache=cache, lengths=[9, 5, 1], last_only=True)
        assert cache.lengths == [9, 5, 1]
        nxt = torch.tensor([[3], [4], [5]])
        step, _ = model(nxt, cache=cache)
        for i, r in enumerate(rows):
            alone, _ = model(torch.cat([r, nxt[i]])[None])
            torch.testing.assert_close(last[i, 0], alone[0, len(r) - 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[i, 0], alone[0, -1], atol=1e-5, rtol=0)


def test_padding_mask_never_leaves_a_query_without_keys():
    mask = GPT._padding_mask(torch.tensor([[True, True, False, False], [True, True, True, True]]))
    assert mask.shape == (2, 1, 4, 4)
    padded = [[1, 0, 0, 0],
              [1, 1, 0, 0],   # real queries never see padding
              [1, 1, 1, 0],   # a padding query sees its own slot: no empty (NaN) softmax row
              [1, 1, 0, 1]]
    assert torch.equal(mask[0, 0], torch.tensor(padded).bool())
    assert torch.equal(mask[1, 0], torch.ones(4, 4).tril().bool())


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_bf16_cache_matches_full_forward(style):
    model = make(style).to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(2, 12)
        assert cache.k[0].dtype == torch.bfloat16  # the plain model caches in its weights' dtype
        stepped = torch.cat([model(idx[:, :5], cache=cache)[0], model(idx[:, 5:], cache=cache)[0]], 1)
    assert full.dtype == torch.bfloat16
    torch.testing.assert_close(stepped.float(), full.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("style", STYLES)
def test_causality(style):
    model = make(style)
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_param_count_gpt2_124m():
    with torch.device("meta"):  # no memory, no init cost
        model = GPT(preset("gpt2-124m"))
    assert model.num_params(non_embedding=False) == 124_439_808  # the published GPT-2 small count
    assert model.num_params() == 124_439_808 - 1024 * 768  # minus position embeddings, as nanoGPT


def test_param_count_llama_tiny_by_hand():
    cfg = preset("llama-tiny")  # V=4096 C=256 L=4 H=8 K=2 D=32, intermediate 704, untied, no biases
    assert cfg.intermediate_size == 704
    per_layer = (256 * (8 + 2 * 2) * 32  # qkv
                 + 256 * 256                # attention output projection
                 + 256 * 2 * 704            # gate_up
                 + 704 * 256                # mlp projection
                 + 2 * 256)                 # two RMSNorm weights
    total = 4 * per_layer + 4096 * 256 * 2 + 256  # + embed + lm_head + final norm
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 4096 * 256  # the input table costs no FLOPs
    assert model.flops_per_token(100) == 6 * (total - 4096 * 256) + 12 * 4 * 8 * 32 * 100


def test_state_dict_names_and_shapes():
    model = make("llama")
    llama = model.state_dict()
    assert llama["blocks.0.attn.qkv.weight"].shape == ((4 + 2 * 2) * 8, 32)  # (H + 2K) * D rows
    assert llama["blocks.1.mlp.gate_up.weight"].shape == (2 * model.config.intermediate_size, 32)
    assert {"blocks.0.attn_norm.weight", "blocks.0.mlp_norm.weight", "final_norm.weight", "lm_head.weight",
            "embed.weight", "blocks.0.mlp.proj.weight", "blocks.0.attn.proj.weight"} <= set(llama)
    assert not any("rope" in k or "cos" in k for k in llama)  # tables are not persistent
    gpt2 = make("gpt2").state_dict()
    assert {"pos_embed.weight", "blocks.0.mlp.fc.bias", "blocks.0.attn.qkv.bias", "blocks.0.attn_norm.bias"} <= set(gpt2)
    sinus = make("sinusoidal").state_dict()
    assert "blocks.0.attn.qkv.bias" in sinus and "blocks.0.attn.proj.bias" not in sinus
    assert not any(k.startswith(("pos_embed", "sinusoid")) for k in sinus)


def test_tied_weights_share_and_untied_do_not():
    tied = make("gpt2")
    assert tied.lm_head.weight is tied.embed.weight
    with torch.no_grad():
        tied.embed.weight[0, 0] = 123.0
    assert tied.lm_head.weight[0, 0] == 123.0
    untied = make("llama")
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_init_follows_gpt2():
    model = GPT(ModelConfig(vocab_size=512, block_size=16, n_layer=8, n_head=4, n_embd=256))
    std = lambda p: p.float().std().item()  # noqa: E731
    assert std(model.blocks[0].mlp.fc.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.blocks[0].mlp.proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std(model.blocks[3].attn.proj.weight) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert (model.blocks[0].attn_norm.weight == 1).all()


@pytest.mark.parametrize("style", STYLES)
def test_loss_at_init_is_uniform(style):
    model = make(style, vocab_size=512)
    gen = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(0, 512, (4, 32), generator=gen), torch.randint(0, 512, (4, 32), generator=gen)
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.15


def test_ignore_index_and_overfit_tiny_batch():
    model = make("llama").train()
    gen = torch.Generator().manual_seed(5)
    idx, targets = torch.randint(0, 97, (2, 16), generator=gen), torch.randint(0, 97, (2, 16), generator=gen)
    targets[:, :4] = -100
    _, loss = model(idx, targets)
    logits, _ = model(idx)
    manual = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, manual)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(40):
        _, loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first


def test_too_long_raises():
    learned = make("gpt2")
    with pytest.raises(LlmkitError, match="block_size=32"):
        learned(torch.zeros(1, 33, dtype=torch.long))
    cache = learned.new_cache(1, 8)
    learned(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(LlmkitError, match="capacity of 8"):
        learned(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("style", ["llama", "sinusoidal"])
def test_fixed_positions_extend_past_block_size(style):
    model = make(style, block_size=8)
    idx = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        long, _ = model(idx)  # grows the tables to 40+ rows
        short, _ = make(style, block_size=64)(idx)  # tables built that long from the start
    torch.testing.assert_close(long, short, atol=1e-5, rtol=0)


def test_sinusoidal_table_formula():
    table = SinusoidalPositions(6, 50).table
    pos, i = 37, 2
    angle = pos / 10000 ** (2 * i / 6)
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_rmsnorm_keeps_dtype_and_normalizes_in_fp32():
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    x = (torch.randn(3, 64) * 1000).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, atol=0, rtol=0)


def test_dropout_is_absent_at_zero_and_active_in_training():
    assert not any(isinstance(m, torch.nn.Dropout) for m in make("gpt2").modules())
    model = make("gpt2", dropout=0.5)
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(7))
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_llama_style_matches_transformers():
    """Our rope/rmsnorm/GQA/swiglu conventions equal HF Llama's once the fused weights are split."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    ours = make("llama", norm_eps=1e-6, rope_theta=500.0)
    cfg = ours.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=cfg.intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-6,
        rope_theta=500.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = ours.state_dict()
    q, k, v, inter = 4 * 8, 2 * 8, 2 * 8, cfg.intermediate_size
    mapped = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["final_norm.weight"],
              "lm_head.weight": sd["lm_head.weight"]}
    for i in range(2):
        qkv, gate_up = sd[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.mlp.gate_up.weight"]
        p = f"model.layers.{i}."
        mapped.update({p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + k],
                       p + "self_attn.v_proj.weight": qkv[q + k:q + k + v],
                       p + "self_attn.o_proj.weight": sd[f"blocks.{i}.attn.proj.weight"],
                       p + "mlp.gate_proj.weight": gate_up[:inter], p + "mlp.up_proj.weight": gate_up[inter:],
                       p + "mlp.down_proj.weight": sd[f"blocks.{i}.mlp.proj.weight"],
                       p + "input_layernorm.weight": sd[f"blocks.{i}.attn_norm.weight"],
                       p + "post_attention_layernorm.weight": sd[f"blocks.{i}.mlp_norm.weight"]})
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    assert not unexpected and all("rotary" in m for m in missing)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_compiled_training_forward_matches_eager():
    model = make("llama", n_layer=1).train()  # compile time grows with depth; one block shows the graph
    gen = torch.Generator().manual_seed(9)
    idx, targets = torch.randint(0, 97, (2, 32), generator=gen), torch.randint(0, 97, (2, 32), generator=gen)
    eager = model(idx, targets)[1]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break fails the test
    loss = compiled(idx, targets)[1]
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-5, rtol=1e-5)
    assert model.blocks[0].attn.qkv.weight.grad is not None


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tokenizer():
    from llmkit.tokenizer import Tokenizer
    return Tokenizer.train_char(["the quick brown fox jumps over the lazy dog. ÉTÉ – ✓"])


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_checkpoint_round_trip(tmp_path, char_tokenizer, style):
    model = make(style, vocab_size=char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "m", model, char_tokenizer)
    loaded, tok = load_checkpoint(tmp_path / "m")
    assert loaded.config == model.config and tok.vocab_size == char_tokenizer.vocab_size
    assert (loaded.lm_head.weight is loaded.embed.weight) == model.config.tie_embeddings
    idx = torch.tensor([char_tokenizer.encode("the lazy fox")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_checkpoint_with_other_config_or_corrupt_weights_raises(tmp_path, char_tokenizer):
    model = make("gpt2", vocab_size=char_tokenizer.vocab_size)
    save_checkpoint(tmp_path / "m", model, char_tokenizer)
    other = make("gpt2", vocab_size=char_tokenizer.vocab_size, n_embd=64)
    save_checkpoint(tmp_path / "other", other, char_tokenizer)
    # config of one model, weights of another
    (tmp_path / "other" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(LlmkitError, match="weights do not match the config"):
        load_checkpoint(tmp_path / "other")
    weights = tmp_path / "m" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(LlmkitError, match="corrupt weights file"):
        load_checkpoint(tmp_path / "m")
    with pytest.raises(LlmkitError, match="no such model"):
        load_checkpoint(tmp_path / "missing")
