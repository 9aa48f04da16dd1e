"""The CUDA paths: bf16 and fp16 autocast (with the gradient scaler), torch.compile, flash SDPA,
pinned-memory batches, nccl (DDP and FSDP), and the serving engine on a GPU.

Every test is marked `cuda` and skips cleanly without a GPU (`pytest -m cuda` selects them);
benchmarks/gpu_check.sh runs them with the GPU benchmarks. Reference: the same run on the CPU in float32.
"""
from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_data_dir, tiny_config, train_losses

from llmkit.train.trainer import Trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data dir and the float32 CPU run's losses."""
    root = tmp_path_factory.mktemp("cuda")
    data_dir = make_data_dir(root)
    Trainer(tiny_config(data_dir, root / "cpu", device="cpu", max_steps=6)).fit()
    return data_dir, train_losses(root / "cpu")


@pytest.fixture(scope="module")
def data_dir(reference):
    return reference[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_training_on_cuda_follows_the_cpu_run(reference, tmp_path, dtype):
    data_dir, cpu_losses = reference
    if dtype == "bfloat16" and not BF16:
        pytest.skip("this GPU has no bfloat16")
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", device="cuda", dtype=dtype, max_steps=6))
    assert trainer.scaler.is_enabled() == (dtype == "float16")  # fp16 needs loss scaling, bf16 does not
    trainer.fit()
    losses = train_losses(tmp_path / "run")
    tol = 1e-3 if dtype == "float32" else 0.05  # TF32 matmuls / half-precision autocast
    assert losses == pytest.approx(cpu_losses, abs=tol)
    if dtype == "float16":
        assert math.isfinite(trainer.scaler.get_scale())


def test_batches_come_from_pinned_memory(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(data_dir, tmp_path / "run", device="cuda", max_steps=1))
    pinned = []
    real = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(1) or real(t, *a))
    x, y = trainer.next_batch(trainer.train_sampler)
    assert x.is_cuda and y.is_cuda and len(pinned) == 2


def test_compiled_training_matches_eager(data_dir, tmp_path):
    kw = dict(device="cuda", max_steps=4, eval_interval=0)
    Trainer(tiny_config(data_dir, tmp_path / "eager", **kw)).fit()
    Trainer(tiny_config(data_dir, tmp_path / "compiled", compile=True, **kw)).fit()
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), abs=1e-3)


@pytest.mark.skipif(not BF16, reason="flash attention needs bfloat16/float16 on a recent GPU")
def test_flash_sdpa_matches_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmkit.model.config import preset
    from llmkit.model.decoder import GPT

    torch.manual_seed(0)
    model = GPT(preset("llama-tiny", vocab_size=256, block_size=128)).cuda().to(torch.bfloat16).eval()
    x = torch.randint(0, 256, (2, 128), device="cuda")
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these inputs
            flash, _ = model(x)
        with sdpa_kernel(SDPBackend.MATH):
            math_, _ = model(x)
    torch.testing.assert_close(flash.float(), math_.float(), atol=5e-2, rtol=5e-2)


def test_serving_engine_on_cuda_gives_the_cpu_greedy_text(tmp_path):
    from conftest import make_tiny_model

    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.infer.sampling import SamplingParams
    from llmkit.infer.generate import generate
    from llmkit.serve.engine import Engine

    model, tok = load_checkpoint(make_tiny_model(tmp_path / "tiny"))
    want = generate(model, tok, "The king", max_new_tokens=16, temperature=0)
    engine = Engine(model.cuda(), tok, max_batch=2, context=64)

    async def go():
        engine.start()
        try:
            job = engine.submit([tok.encode("The king")], SamplingParams(max_new_tokens=16, temperature=0))
            text = ""
            while True:
                ev = await asyncio.wait_for(job.events.get(), timeout=60)
                text += ev.text
                if ev.finish:
                    return text
        finally:
            engine.stop()

    assert asyncio.run(go()) == want


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs two GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nccl_two_gpus_follow_one_gpu(data_dir, tmp_path, strategy):
    from conftest import free_port

    kw = dict(device="cuda", batch_size=8, max_steps=4, lr_decay_steps=4, eval_interval=0)
    config = tiny_config(data_dir, tmp_path / "one", **kw)
    Trainer(config).fit()
    overrides = [f"{k}={v}" for k, v in config.to_dict().items() if k not in ("model", "out_dir") and v is not None]
    overrides += [f"model.{k}={v}" for k, v in config.model.items()]
    overrides += [f"out_dir={tmp_path / 'two'}", f"strategy={strategy}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "llmkit.cli", "train", *overrides]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), abs=1e-3)
