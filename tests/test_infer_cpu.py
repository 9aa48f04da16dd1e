"""llmkit.infer.cpu: the CPU routes are swapped in at load time, give the plain model's results, and
never reach training; llmkit/model/ stays plain."""
import re
from pathlib import Path

import pytest
import torch
from conftest import make_data_dir, tiny_config

from llmkit.infer import kernels
from llmkit.model.config import ModelConfig
from llmkit.infer import cpu
from llmkit.infer.cpu import (CpuAttention, CpuEncoderAttention, CpuLinear, CpuRMSNorm, optimize_for_inference,
                              optimize_for_training)
from llmkit.model.decoder import GPT
from llmkit.model.encoder import Encoder, EncoderConfig
from llmkit.model.layers import CausalSelfAttention, RMSNorm

LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=True)


def llama(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32), **LLAMA,
                              **overrides})).eval()


def test_model_package_holds_no_speed_code():
    for path in (Path(__file__).parents[1] / "llmkit" / "model").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"kernel|llmkit\.infer|TorchFunctionMode|\.type == \"cpu\"", text), path.name


def test_swap_replaces_by_type_in_place_and_keeps_ties():
    model = llama()
    plain = {name: type(m) for name, m in model.named_modules()}
    params = dict(model.named_parameters())
    assert optimize_for_inference(model) is model
    kinds = {type(m) for m in model.modules()}
    assert {CpuLinear, CpuRMSNorm, CpuAttention} <= kinds
    assert not kinds & {torch.nn.Linear, RMSNorm, CausalSelfAttention}
    assert model.lm_head.weight is model.embed.weight and dict(model.named_parameters()) == params
    assert model.cache_dtype == torch.float32
    optimize_for_inference(model)  # twice is once
    assert {name: type(m) for name, m in model.named_modules()}.keys() == plain.keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_model_decodes_as_the_plain_one(dtype):
    plain, fast = llama().to(dtype), optimize_for_inference(llama().to(dtype))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))

    def decode(model):
        with torch.inference_mode():
            cache = model.new_cache(1, 16)
            steps = [model(ids[:, :8], cache=cache)[0][:, -1]]
            steps += [model(ids[:, t:t + 1], cache=cache)[0][:, -1] for t in range(8, 12)]
        return torch.stack(steps).float()

    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(decode(fast), decode(plain), atol=tolerance, rtol=tolerance)


def test_half_precision_prefill_runs_fp32_gemms_only_without_native_support(monkeypatch):
    model = optimize_for_inference(llama().to(torch.bfloat16))
    idx = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(3))
    upcasts = []
    real = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, "float", lambda t: upcasts.append(t.shape) or real(t))
    monkeypatch.setattr(cpu, "cpu_has_half_matmuls", lambda dtype: False)
    with torch.no_grad():
        upcast, _ = model(idx)
        assert (20, 32) in [tuple(s)[-2:] for s in upcasts]  # activations of 20 rows went to fp32
        upcasts.clear()
        with torch.enable_grad():
            model(idx)  # autograd on (training): the plain bf16 products
        assert not [s for s in upcasts if len(s) == 2 and s[0] > 1]
        monkeypatch.setattr(cpu, "cpu_has_half_matmuls", lambda dtype: True)
        native, _ = model(idx)
    assert upcast.dtype == native.dtype == torch.bfloat16
    # the same products, fp32 accumulation either way: only bf16 roundings of intermediates differ
    assert (upcast.float() - native.float()).abs().max() < 0.1 * native.float().abs().max()


def test_short_sequences_attend_through_matmuls_in_inference_and_training(monkeypatch):
    calls = []
    real = cpu.matmul_attention
    monkeypatch.setattr(cpu, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    plain, fast = llama(), optimize_for_inference(llama())
    idx = torch.randint(0, 97, (3, 32), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx)[0], plain(idx)[0], atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # one per layer
    # training installs only the attention route: same loss and gradients as SDPA's
    plain, trained = llama().train(), optimize_for_training(llama()).train()
    assert {type(b.attn) for b in trained.blocks} == {CpuAttention}
    assert not any(isinstance(m, (cpu.CpuLinear, cpu.CpuRMSNorm)) for m in trained.modules())
    plain(idx, idx)[1].backward()
    trained(idx, idx)[1].backward()
    assert len(calls) == 4
    for (name, p), q in zip(plain.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_encoder_swap_gives_the_same_embeddings(monkeypatch):
    torch.manual_seed(0)
    config = EncoderConfig(vocab_size=50, max_position=32, n_layer=2, n_head=2, n_embd=16)
    plain = Encoder(config).eval()
    fast = Encoder(config).eval()
    fast.load_state_dict(plain.state_dict())
    optimize_for_inference(fast)
    assert {type(b.attn) for b in fast.blocks} == {CpuEncoderAttention}
    calls = []
    real = cpu.matmul_attention
    monkeypatch.setattr(cpu, "matmul_attention", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(fast(ids, mask)[0], plain(ids, mask)[0], atol=1e-6, rtol=1e-5)
    assert len(calls) == 2


def test_training_takes_only_the_short_attention_route(tmp_path, monkeypatch):
    """The Trainer runs (and evaluates) the plain modules but for CpuAttention's matmul route: no
    kernel call, no CpuLinear or CpuRMSNorm."""
    from llmkit.train.trainer import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("inference route taken in training")
    for name in ("matvec", "rms_norm", "decode_attention"):
        monkeypatch.setattr(kernels, name, refuse)
    trainer = Trainer(tiny_config(make_data_dir(tmp_path), tmp_path / "run", max_steps=3, eval_interval=2))
    trainer.fit()
    kinds = {type(m) for m in trainer.raw_model.modules()}
    assert CpuAttention in kinds and not {CpuLinear, CpuRMSNorm} & kinds
