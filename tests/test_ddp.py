"""DDP: two CPU processes under torchrun follow the same trajectory as one process with the same global batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_data_dir, read_metrics, tiny_config

from llmkit.io.checkpoint import load_checkpoint
from llmkit.train.trainer import Trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    data_dir = make_data_dir(tmp_path)
    # grad_accum=2 exercises no_sync on the first micro-step; batch 8 = 4 rows per rank.
    settings = dict(batch_size=8, grad_accum=2, max_steps=4, lr_decay_steps=4, eval_interval=2, log_interval=1)
    Trainer(tiny_config(data_dir, tmp_path / "single", **settings)).fit()

    overrides = [f"{k}={v}" for k, v in settings.items()] + [
        f"data_dir={data_dir}", f"out_dir={tmp_path / 'ddp'}", "preset=char-tiny", "model.n_layer=2",
        "model.n_head=2", "model.n_embd=32", "block_size=16", "lr=3e-3", "min_lr=3e-4", "warmup_steps=2",
        "eval_iters=2", "ckpt_interval=0", "progress=false", "peak_flops=1e11"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "llmkit.cli", "train", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("model saved to") == 1  # only rank 0 prints

    single, ddp = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "ddp")
    assert [sorted(r) for r in ddp] == [sorted(r) for r in single]  # rank 0 alone wrote one log
    for a, b in zip(single, ddp):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    model_single, _ = load_checkpoint(tmp_path / "single")
    model_ddp, _ = load_checkpoint(tmp_path / "ddp")
    for name, tensor in model_single.state_dict().items():
        torch.testing.assert_close(model_ddp.state_dict()[name], tensor, atol=1e-5, rtol=1e-4)
