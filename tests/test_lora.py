"""LoRA adapters: frozen base, identity at init, merge == adapter-on, save/load alone, bad targets."""
import json

import pytest
import torch


from llmkit.model.config import preset
from llmkit.errors import LlmkitError
from llmkit.model.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, apply_lora, count_parameters,
                         load_adapter, lora_modules, merge_lora, save_adapter)
from llmkit.model.decoder import GPT


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=48)
    return GPT(preset("llama-tiny", **{**cfg, **overrides}))


def randomize(model, seed=1):
    """Non-zero B so adapters actually change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def tokens(seed=2, shape=(3, 20)):
    return torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(seed))


def test_base_frozen_and_only_adapters_train():
    model = tiny()
    names = apply_lora(model, LoRAConfig(rank=4))
    assert len(names) == 2 * 4  # qkv, proj, gate_up, mlp.proj in each of 2 blocks
    trainable, total = count_parameters(model)
    expected = sum(4 * (m.in_features + m.out_features) for m in lora_modules(model).values())
    assert trainable == expected and trainable < 0.2 * total
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    base_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = tokens()
    losses = []
    for _ in range(15):
        _, loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_fresh_adapter_is_the_base_model_and_state_names_are_kept():
    model = tiny()
    x = tokens()
    ref, _ = model.eval()(x)
    base_keys = set(model.state_dict())
    apply_lora(model, LoRAConfig(rank=8, targets=["qkv", "mlp.proj"]))
    assert set(model.state_dict()) - base_keys == {k for k in model.state_dict() if "lora_" in k}
    assert base_keys <= set(model.state_dict())
    out, _ = model.eval()(x)
    assert torch.equal(out, ref)
    assert sorted(lora_modules(model)) == ["blocks.0.attn.qkv", "blocks.0.mlp.proj",
                                           "blocks.1.attn.qkv", "blocks.1.mlp.proj"]


@pytest.mark.parametrize("overrides", [{}, {"bias": True, "mlp": "gelu", "norm": "layernorm", "tie_embeddings": True}])
def test_merged_logits_equal_adapter_logits(overrides):
    model = tiny(**overrides)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1))
    randomize(model)
    model.eval()  # dropout off: the adapter path is deterministic
    x = tokens()
    adapted, _ = model(x)
    base_out, _ = tiny(**overrides).eval()(x)
    assert (adapted - base_out).abs().max() > 1e-3  # the adapters do something
    merge_lora(model)
    assert not lora_modules(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    merged, _ = model(x)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.embed.weight  # tying survives the merge


def test_adapter_saved_alone_and_reloaded(tmp_path):
    model = tiny()
    apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"]))
    randomize(model)
    x = tokens()
    expected, _ = model.eval()(x)
    save_adapter(model, tmp_path, extra={"base": "tiny"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert all("lora_" in k for k in saved) and len(saved) == 2 * len(lora_modules(model))
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["lora"]["rank"] == 4 and meta["base"] == "tiny"

    fresh = tiny()  # same seed: same base weights
    load_adapter(fresh, tmp_path)
    got, _ = fresh.eval()(x)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_dropout_only_in_training():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5))
    randomize(model)
    x = tokens()
    model.train()
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_unknown_target_module_is_a_clear_error():
    model = tiny()
    with pytest.raises(LlmkitError, match="'q_proj' matches no linear layer; available: .*qkv"):
        apply_lora(model, LoRAConfig(targets=["q_proj"]))
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # untouched


def test_tied_output_head_is_refused():
    model = tiny(tie_embeddings=True)
    with pytest.raises(LlmkitError, match="shares its weight with the embedding"):
        apply_lora(model, LoRAConfig(targets=["lm_head"]))


@pytest.mark.parametrize("bad", [dict(rank=0), dict(alpha=-1), dict(dropout=1.0), dict(targets=[])])
def test_bad_lora_settings(bad):
    with pytest.raises(LlmkitError):
        LoRAConfig(**bad)


def test_adapter_for_another_model_is_rejected(tmp_path):
    model = tiny()
    apply_lora(model, LoRAConfig(rank=4))
    save_adapter(model, tmp_path)
    wider = tiny(n_embd=64)
    with pytest.raises(LlmkitError, match="has shape"):
        load_adapter(wider, tmp_path)
    assert not lora_modules(wider)  # checked before anything was wrapped
    with pytest.raises(LlmkitError, match="not a LoRA adapter directory"):
        load_adapter(tiny(), tmp_path / "nowhere")
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(LlmkitError, match="corrupt adapter weights"):
        load_adapter(tiny(), tmp_path)


def test_adapting_twice_is_refused():
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(LlmkitError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2))


@pytest.mark.slow
def test_smollm2_lora_sft_teaches_a_new_behaviour(tmp_path):
    """The real thing, shortened: SmolLM2-135M answers held-out questions in prose before LoRA SFT
    and as {"answer": ...} JSON after a few steps (examples/lora_sft_smollm2.py, full length)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("llmkit.io.resolve").embedded_model_path("smollm2-135m-instruct")
    path = Path(__file__).resolve().parents[1] / "examples" / "lora_sft_smollm2.py"
    spec = importlib.util.spec_from_file_location("lora_sft_smollm2", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    before, after = example.run(tmp_path, steps=12, batch_size=6, lr=3e-3, n_train=96, threads=1,
                                log=lambda *_: None)
    assert before <= 1 / 6 and after >= 5 / 6
