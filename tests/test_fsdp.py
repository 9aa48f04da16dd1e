"""FSDP2 (strategy=fsdp): two gloo processes follow one process and DDP; sharded checkpoints resume
at another world size (2 -> 1, 1 -> 2) and convert into a single safetensors model.

Tolerance: decoder losses agree to 1e-5 absolute (float32; only the order of the gradient sums
differs). MLM losses agree to 2% with one process (each rank averages over its own masked tokens)
and to 1e-5 between FSDP and DDP (the same per-rank averaging)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, make_data_dir, run_cli, tiny_config, train_losses

from llmkit.io.checkpoint import load_checkpoint
from llmkit.train.encoder import EncoderTrainer
from llmkit.io.encoders import load_encoder
from llmkit.train.trainer import Trainer

HERE = Path(__file__).parent
# grad_accum=2: the first micro-step of each optimizer step must not reduce gradients
DECODER = dict(batch_size=8, grad_accum=2, max_steps=4, lr_decay_steps=4, eval_interval=2)
ENCODER = dict(objective="mlm", preset="bert-tiny", batch_size=8, max_steps=4, lr_decay_steps=4, eval_interval=2,
               model={"n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64})


def torchrun(runs: list, tmp_path: Path, nproc: int = 2) -> None:
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([{**c.to_dict(), "resume": r} for c, r in runs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / "dist_driver.py"), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_losses(run, reference, steps, **tol):
    got, want = train_losses(run), train_losses(reference)
    assert sorted(got) == sorted(want) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], **tol), step


@pytest.mark.slow
def test_fsdp_two_processes_match_ddp_and_one_process_and_reshard(tmp_path, monkeypatch, capsys):
    data = make_data_dir(tmp_path)
    dec = lambda name, **kw: tiny_config(data, tmp_path / name, **{**DECODER, **kw})  # noqa: E731
    enc = lambda name, **kw: tiny_config(data, tmp_path / name, **{**ENCODER, **kw})  # noqa: E731
    single = Trainer(dec("single"))
    single.fit()
    EncoderTrainer(enc("enc-single")).fit()
    Trainer(dec("one-then-two", strategy="fsdp", max_steps=2)).fit()  # one process, sharded checkpoint
    torchrun([(dec("fsdp", strategy="fsdp", activation_checkpointing=True), False),
              (dec("ddp"), False),
              (enc("enc-fsdp", strategy="fsdp"), False),
              (enc("enc-ddp"), False),
              (dec("two-then-one", strategy="fsdp", max_steps=2), False),
              (dec("one-then-two", strategy="fsdp"), True)], tmp_path)
    Trainer(dec("two-then-one", strategy="fsdp"), resume=True).fit()

    for run in ("fsdp", "ddp", "one-then-two", "two-then-one"):
        assert_losses(tmp_path / run, tmp_path / "single", range(1, 5), abs=1e-5)
    assert_losses(tmp_path / "enc-fsdp", tmp_path / "enc-ddp", range(1, 5), abs=1e-5)
    assert_losses(tmp_path / "enc-fsdp", tmp_path / "enc-single", range(1, 5), rel=0.02)

    # each rank wrote its shard; the run dir loads as one model, and convert writes one safetensors file
    assert sorted(p.name for p in (tmp_path / "fsdp" / "shards").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                 "__1_0.distcp"]
    code, _, err = run_cli(monkeypatch, capsys, "convert", tmp_path / "fsdp", tmp_path / "merged")
    assert code == 0, err
    merged, _ = load_checkpoint(tmp_path / "merged")
    for name, tensor in single.raw_model.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[name], tensor, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    encoder, _ = load_encoder(tmp_path / "enc-fsdp")
    assert encoder.task == "mlm"


def test_fsdp_in_one_process_bf16_and_activation_checkpointing(tmp_path):
    data = make_data_dir(tmp_path)
    kw = dict(max_steps=2, eval_interval=0, model={"n_layer": 1})
    plain = Trainer(tiny_config(data, tmp_path / "plain", **kw))
    plain.fit()
    ac = Trainer(tiny_config(data, tmp_path / "ac", strategy="fsdp", activation_checkpointing=True, **kw))
    ac.fit()
    assert train_losses(tmp_path / "ac") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-6)
    bf16 = Trainer(tiny_config(data, tmp_path / "bf16", strategy="fsdp", dtype="bfloat16", **kw))
    bf16.fit()  # parameters cast to bf16 for compute, reduced and updated in float32
    assert train_losses(tmp_path / "bf16") == pytest.approx(train_losses(tmp_path / "plain"), abs=0.05)
    assert next(bf16.raw_model.parameters()).dtype == torch.float32
    with pytest.raises(Exception, match="whole-model"):
        shutil.copytree(tmp_path / "plain", tmp_path / "plain2", symlinks=True)
        Trainer(tiny_config(data, tmp_path / "plain2", strategy="fsdp", **{**kw, "max_steps": 3}), resume=True)
