"""FSDP2 (strategy=fsdp): two gloo processes follow one process and DDP; sharded checkpoints resume
at another world size (2 -> 1, 1 -> 2) and convert into a single safetensors model; SFT (LoRA and
full) and seq2seq training run sharded too.

Tolerance: decoder losses agree to 1e-5 absolute (float32; only the order of the gradient sums
differs). MLM losses agree to 2% with one process (each rank averages over its own masked tokens)
and to 1e-5 between FSDP and DDP (the same per-rank averaging); so do SFT and seq2seq losses (each
rank averages over its own target tokens, under either strategy)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (free_port, make_data_dir, read_metrics, run_cli, tiny_config, tiny_model_dir, tiny_tokenizer,
                      train_losses, write_jsonl)

from llmkit.data.pairs import prepare_pairs
from llmkit.errors import LlmkitError
from llmkit.io import snapshots
from llmkit.io.checkpoint import load_checkpoint
from llmkit.model.lora import ADAPTER_WEIGHTS
from llmkit.tokenizer import Tokenizer
from llmkit.train.config import TrainConfig
from llmkit.train import distributed
from llmkit.train.encoder import EncoderTrainer
from llmkit.io.encoders import load_encoder
from llmkit.train.trainer import Trainer

HERE = Path(__file__).parent
# grad_accum=2: the first micro-step of each optimizer step must not reduce gradients
DECODER = dict(batch_size=8, grad_accum=2, max_steps=4, lr_decay_steps=4, eval_interval=2)
ENCODER = dict(objective="mlm", preset="bert-tiny", batch_size=8, max_steps=4, lr_decay_steps=4, eval_interval=2,
               model={"n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64})


def torchrun(runs: list, tmp_path: Path, nproc: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    """runs: (TrainConfig, resume) or (TrainConfig, resume, extra driver keys) tuples (tests/dist_driver.py)."""
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([{**c.to_dict(), "resume": r, **(rest[0] if rest else {})} for c, r, *rest in runs]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / "dist_driver.py"), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-4000:]
    return proc


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
              (enc("enc-fsdp", strategy="fsdp", fsdp_unit_mb=0), False),
              (enc("enc-ddp"), False),
              (dec("two-then-one", strategy="fsdp", max_steps=2, fsdp_unit_mb=0), False),
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


def test_fsdp_units_group_blocks_by_size_and_the_last_stays_gathered(tmp_path):
    """fsdp_unit_mb groups consecutive blocks into FSDP units (fewer, larger collectives); the last
    unit is not resharded after forward (its backward comes next); nonsense values are one clear line."""
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LlmkitError, match=r"^fsdp_unit_mb must be a number >= 0, got"):
            TrainConfig(fsdp_unit_mb=bad)
    with pytest.raises(LlmkitError, match="fsdp_unit_mb"):
        TrainConfig(fsdp_unit_mb="lots")
    kb = [torch.nn.Linear(256, 1, bias=False) for _ in range(5)]  # 1 KiB of parameters each
    assert [len(g) for g in distributed.units(kb, 2048)] == [2, 2, 1]
    assert [len(g) for g in distributed.units(kb, 0)] == [1] * 5
    assert [len(g) for g in distributed.units(kb, 1e9)] == [5]

    data = make_data_dir(tmp_path)
    block_mb = 12_352 * 4 / 2**20  # parameters of one char-tiny block with n_embd 32, in MB
    trainer = Trainer(tiny_config(data, tmp_path / "run", strategy="fsdp", fsdp_unit_mb=1.5 * block_mb,
                                  model={"n_layer": 4}, max_steps=1, eval_interval=0))
    model = trainer.raw_model
    assert sum(p.numel() for p in model.blocks[0].parameters()) == 12_352
    gathered = lambda block: not any(hasattr(p, "to_local") for p in block.parameters())  # noqa: E731
    x, y = trainer.next_batch(trainer.train_sampler)
    loss = trainer.compute_loss(x, y)
    assert [gathered(b) for b in model.blocks] == [False, False, True, True]  # units: blocks 0-1, 2-3
    loss.backward()
    assert not any(gathered(b) for b in model.blocks)
    model.blocks[0].unshard()  # one unit: gathering block 0 gathers block 1 with it
    assert [gathered(b) for b in model.blocks] == [True, True, False, False]
    model.reshard()
    trainer.close()


def sft_config(chats, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(data_dir=str(chats), out_dir=str(out), block_size=32, batch_size=4, grad_accum=2,
                                 max_steps=4, lr=1e-2, warmup_steps=1, lr_decay_steps=1000, eval_interval=0,
                                 ckpt_interval=2, log_interval=1, progress=False, peak_flops=1e11), **kw})


def seq2seq_data(root: Path) -> Path:
    rng = random.Random(0)
    words = [" ".join("".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4))) for _ in range(3))
             for _ in range(64)]
    write_jsonl(root / "pairs.jsonl", [{"source": w, "target": w[::-1].upper()} for w in words])
    prepare_pairs([root / "pairs.jsonl"], root / "pairs", Tokenizer.train_char(["abcdef ABCDEF"]), val_fraction=0.1)
    return root / "pairs"


def seq2seq_config(data, out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(data_dir=str(data), out_dir=str(out), preset="seq2seq-tiny", objective="seq2seq",
                                 model={"n_layer": 2, "n_head": 2, "n_embd": 32, "intermediate_size": 64,
                                        "dropout": 0.1},
                                 batch_size=8, block_size=32, max_steps=4, lr=3e-3, warmup_steps=2,
                                 lr_schedule="inverse_sqrt", eval_interval=2, log_interval=1, progress=False,
                                 peak_flops=1e11), **kw})


@pytest.mark.slow
def test_fsdp_trains_lora_sft_full_sft_and_seq2seq_like_ddp(tmp_path, monkeypatch, capsys):
    tok = tiny_tokenizer()
    base = str(tiny_model_dir(tmp_path / "base", tok, tie_embeddings=True))  # as SmolLM2: a frozen alias too
    # every reply as long as every other: one process's mean over all reply tokens is then the mean of
    # two ranks' means, so the run resumed in one process can follow the two-process one
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": f"capital of zorbia {'and of yonder ' * (i % 3)}{i}?"},
                      {"role": "assistant", "content": "quibble"}]} for i in range(24)])
    lora = {"sft": {"model": base, "lora": {"rank": 4, "targets": ["all-linear"]}}}
    full = {"sft": {"model": base, "lora": None}}
    pairs = seq2seq_data(tmp_path)
    torchrun([(sft_config(chats, tmp_path / "lora-fsdp", strategy="fsdp"), False, lora),
              (sft_config(chats, tmp_path / "lora-ddp"), False, lora),
              (sft_config(chats, tmp_path / "lora-2-then-1", strategy="fsdp", max_steps=2), False, lora),
              (sft_config(chats, tmp_path / "full-fsdp", strategy="fsdp", lr=1e-3), False, full),
              (sft_config(chats, tmp_path / "full-ddp", lr=1e-3), False, full),
              (seq2seq_config(pairs, tmp_path / "s2s-fsdp", strategy="fsdp", activation_checkpointing=True), False),
              (seq2seq_config(pairs, tmp_path / "s2s-ddp"), False)], tmp_path)
    # the LoRA run resumed in one process from the shards two wrote (adapters and their moments only)
    from llmkit.model.lora import LoRAConfig
    from llmkit.train.sft import SFTTrainer

    SFTTrainer(sft_config(chats, tmp_path / "lora-2-then-1", strategy="fsdp"), model=base,
               lora=LoRAConfig(rank=4), resume=True, log=lambda *_: None).fit()
    for fsdp, ddp in (("lora-fsdp", "lora-ddp"), ("lora-2-then-1", "lora-ddp"), ("full-fsdp", "full-ddp"),
                      ("s2s-fsdp", "s2s-ddp")):
        assert_losses(tmp_path / fsdp, tmp_path / ddp, range(1, 5), abs=1e-5)
    val = lambda run: [r["val_loss"] for r in read_metrics(tmp_path / run) if "val_loss" in r]  # noqa: E731
    assert len(val("s2s-fsdp")) == 2 and val("s2s-fsdp") == pytest.approx(val("s2s-ddp"), abs=1e-5)

    # the adapters are written whole, the base is not in the shards, and the merged model is DDP's
    from safetensors.torch import load_file
    adapters = load_file(tmp_path / "lora-fsdp" / ADAPTER_WEIGHTS)
    for name, tensor in load_file(tmp_path / "lora-ddp" / ADAPTER_WEIGHTS).items():
        torch.testing.assert_close(adapters[name], tensor, atol=1e-5, rtol=1e-4)
    assert all(k.endswith(("lora_A", "lora_B")) for k in sharded_names(tmp_path / "lora-fsdp"))
    for a, b in (("lora-fsdp", "lora-ddp"), ("full-fsdp", "full-ddp"), ("s2s-fsdp", "s2s-ddp")):
        got, want = load_checkpoint(tmp_path / a)[0].state_dict(), load_checkpoint(tmp_path / b)[0].state_dict()
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, atol=1e-5, rtol=1e-4, msg=f"{a} {name}")

    # resuming with the other strategy is one clear line
    with pytest.raises(LlmkitError, match="is sharded .strategy=fsdp.; resume with that strategy"):
        SFTTrainer(sft_config(chats, tmp_path / "lora-fsdp", max_steps=6), model=base, lora=LoRAConfig(rank=4),
                   resume=True, log=lambda *_: None)


def sharded_names(run: Path) -> set[str]:
    from llmkit.io.sharded import SHARDS, weight_names

    return weight_names(run / SHARDS)


@pytest.mark.slow
def test_a_rank_dying_mid_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 dies halfway through writing its shard of step 4 (rank 0 is inside the collective save):
    `latest` still names step 2, the half-written step is never taken for a checkpoint, and resuming
    (here in one process) continues from step 2 as an uninterrupted run does."""
    data = make_data_dir(tmp_path)
    run = lambda name, **kw: tiny_config(data, tmp_path / name, **{**DECODER, "ckpt_interval": 2, **kw})  # noqa: E731
    Trainer(run("straight")).fit()
    proc = torchrun([(run("died", strategy="fsdp"), False, {"die": {"rank": 1, "step": 4}})], tmp_path, ok=False)
    assert "exitcode  : 17" in proc.stderr, proc.stderr[-2000:]  # it was our fault, not another error
    out = tmp_path / "died"
    assert snapshots.latest(out).name == "step-00000002"
    assert (out / ".checkpoints" / "step-00000004.tmp" / "shards").is_dir()  # what the crash left
    assert load_checkpoint(out)[0] is not None  # the run dir reads as step 2's model meanwhile
    resumed = Trainer(run("died", strategy="fsdp"), resume=True)
    assert resumed.step == 2
    resumed.fit()
    assert_losses(out, tmp_path / "straight", range(1, 5), abs=1e-5)
    assert sorted(p.name for p in (out / ".checkpoints").iterdir()) == ["latest", "step-00000004"]


FREES = """
import sys
from pathlib import Path
import torch
from llmkit.train import distributed

def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

if not distributed.return_freed_buffers_to_os():
    sys.exit(3)
warm = torch.ones(2 << 20)  # 8 MB: once freed, glibc's own threshold would rise past such buffers
del warm
big, small = [], []
for _ in range(32):  # FSDP's pattern: large buffers freed, small tensors living on between them
    big.append(torch.ones(2 << 20))
    small.append(torch.ones(1024))
before = rss_mb()
del big
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_strategy_fsdp_gives_freed_buffers_back_to_the_os():
    """256 MB of 8 MB buffers freed between small live tensors: resident memory drops by all of it
    (with glibc's default it drops by 0 MB: the heap keeps them, which made FSDP's peak as high as DDP's)."""
    proc = subprocess.run([sys.executable, "-c", FREES], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)})
    if proc.returncode == 3:
        pytest.skip("not glibc")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) > 240, proc.stdout
