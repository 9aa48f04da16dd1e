"""Objectives: BERT masking statistics, InfoNCE, and encoder training (mlm, contrastive) in the Trainer."""
import json
import math

import pytest
import torch

from conftest import INTENTS, intent_data, run_cli, shared_file, tiny_encoder_dir, write_jsonl
from llmkit.train.encoder import EncoderTrainer
from llmkit.io.encoders import load_encoder
from llmkit.errors import LlmkitError
from llmkit.model.encoder import Encoder, EncoderConfig
from llmkit.train.losses import IGNORE_INDEX, contrastive_objective, info_nce, mask_tokens
from llmkit.train.trainer import TrainConfig



def test_masking_follows_15_percent_and_80_10_10():
    ids = torch.randint(5, 1000, (200, 500), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS]-like and [SEP]-like specials
    inputs, labels = mask_tokens(ids, mask_id=3, vocab_size=1000, special_ids=[1, 2],
                                 generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE_INDEX
    assert abs(selected.float().mean().item() - 0.15 * 498 / 500) < 0.005
    assert not selected[:, 0].any() and not selected[:, -1].any()  # specials never selected
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])  # unselected tokens untouched
    n = selected.sum().item()
    masked = (inputs[selected] == 3).sum().item() / n
    unchanged = (inputs[selected] == ids[selected]).sum().item() / n
    randomised = 1 - masked - unchanged
    assert abs(masked - 0.8) < 0.01 and abs(unchanged - 0.1) < 0.01 and abs(randomised - 0.1) < 0.01


def test_masking_is_reproducible_from_the_generator():
    ids = torch.randint(5, 100, (4, 32))
    a = mask_tokens(ids, 3, 100, generator=torch.Generator().manual_seed(7))
    b = mask_tokens(ids, 3, 100, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_masked_window_sampler_masks_the_global_batch_the_same_on_every_rank():
    """Rank r of N gets exactly rows r of the batch (windows and masks) one process would draw."""
    from llmkit.data.corpus import RandomWindowSampler
    from llmkit.train.encoder import MaskedWindowSampler

    tokens = torch.randint(3, 100, (5000,)).numpy()

    def sampler(rank, world):
        windows = RandomWindowSampler(tokens, 16, 4 // world, seed=3, rank=rank, world_size=world)
        return MaskedWindowSampler(windows, 0, 100, [1, 2], seed=3, rank=rank, world_size=world)
    single, ranks = sampler(0, 1), [sampler(r, 2) for r in range(2)]
    for _ in range(3):
        x, y = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_info_nce():
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    assert info_nce(x, x, temperature=0.01).item() < 1e-3  # each anchor finds itself
    random_loss = info_nce(torch.randn(256, 64), torch.randn(256, 64), temperature=1.0).item()
    assert abs(random_loss - math.log(256)) < 0.2  # chance level: log(B)
    a, p = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    loss = info_nce(a, p, 0.05, symmetric=True)
    loss.backward()
    assert a.grad.abs().sum() > 0
    # temperature sharpens: the same similarities give a lower loss when aligned
    assert info_nce(x, x + 0.1 * torch.randn(8, 16), 0.05) < info_nce(x, x + 0.1 * torch.randn(8, 16), 1.0)


def test_contrastive_objective_pads_both_views_and_uses_dropout():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=30, max_position=16, n_layer=1, n_head=2, n_embd=16, dropout=0.2))
    x = torch.randint(1, 30, (4, 6))
    y = torch.randint(1, 30, (4, 9))
    loss = contrastive_objective(model, x, y)
    loss.backward()
    assert torch.isfinite(loss) and model.embed.weight.grad is not None
    model.eval()  # without dropout, identical views match exactly: lower loss than with dropout
    with torch.no_grad():
        assert contrastive_objective(model, x, x) < contrastive_objective(model.train(), x, x)


# ---- training through the Trainer ---------------------------------------------------------------

@pytest.fixture(scope="module")
def shakespeare_data(tmp_path_factory):
    from llmkit.data.corpus import prepare
    from llmkit.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("mlm")
    corpus = root / "ts.txt"
    corpus.write_text(shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    prepare([corpus], root / "data", Tokenizer.train_bpe([corpus.read_text(encoding="utf-8")], 512))
    return root / "data"


def mlm_config(data, out, **kw):
    base = dict(data_dir=str(data), out_dir=str(out), objective="mlm", preset="bert-tiny",
                model={"n_embd": 64, "intermediate_size": 128}, batch_size=16, block_size=32, max_steps=40,
                lr=2e-3, min_lr=2e-4, warmup_steps=4, lr_decay_steps=40, eval_interval=0, eval_iters=4,
                log_interval=5, ckpt_interval=0, progress=False, peak_flops=1e11)
    return TrainConfig(**{**base, **kw})


def test_mlm_pretraining_lowers_loss(shakespeare_data, tmp_path):
    out = tmp_path / "run"
    EncoderTrainer(mlm_config(shakespeare_data, out)).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[0] > losses[-1] + 0.5, losses  # starts near log(513) = 6.2
    assert any("val_loss" in r for r in records)
    model, tok = load_encoder(out)  # the checkpoint: an encoder with its MLM head and a mask token
    assert model.task == "mlm" and tok.token_to_id("<|mask|>") == model.config.vocab_size - 1


def test_mlm_resume_reproduces_uninterrupted_run(shakespeare_data, tmp_path):
    kw = dict(max_steps=12, lr_decay_steps=12, log_interval=1, model={"n_layer": 1, "n_embd": 32,
                                                                       "intermediate_size": 64})
    EncoderTrainer(mlm_config(shakespeare_data, tmp_path / "full", **kw)).fit()
    EncoderTrainer(mlm_config(shakespeare_data, tmp_path / "part", **{**kw, "max_steps": 7})).fit()
    EncoderTrainer(mlm_config(shakespeare_data, tmp_path / "part", **kw), resume=True).fit()

    def losses(d):
        return {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}
    full, part = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [full[s] for s in range(8, 13)] == pytest.approx([part[s] for s in range(8, 13)], rel=1e-5)


def test_contrastive_training_pulls_pairs_together(tmp_path):
    records = intent_data(400, seed=3)
    texts = [r["text"] for r in records]
    base = tiny_encoder_dir(tmp_path / "base", texts, dropout=0.1)
    by_intent = {k: [r["text"] for r in records if r["label"] == k] for k in INTENTS}
    pairs = [{"anchor": t, "positive": by_intent[r["label"]][(i * 7) % len(by_intent[r["label"]])]}
             for i, (t, r) in enumerate(zip(texts, records))]
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    config = TrainConfig(data_dir=str(data), out_dir=str(tmp_path / "cl"), objective="contrastive", batch_size=16,
                         block_size=32, max_steps=30, lr=2e-3, min_lr=2e-4, warmup_steps=3, lr_decay_steps=30,
                         eval_interval=0, log_interval=5, ckpt_interval=0, progress=False, peak_flops=1e11)
    EncoderTrainer(config, model=str(base)).fit()
    losses = [json.loads(line).get("loss") for line in (tmp_path / "cl" / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert losses[-1] < losses[0] - 0.3, losses
    model, tok = load_encoder(tmp_path / "cl")
    assert model.task is None and tok.hf.truncation["max_length"] == 64  # the model's limit, not block_size


def test_train_cli_objectives_and_errors(shakespeare_data, tmp_path, monkeypatch, capsys):
    sentences = tmp_path / "s.txt"
    sentences.write_text("".join(f"{r['text']}\n" for r in intent_data(80, seed=1)))
    base = tiny_encoder_dir(tmp_path / "base", sentences.read_text().splitlines())
    code, out, err = run_cli(monkeypatch, capsys, "train", "--objective", "contrastive", "--model", base,
                             "--data", sentences, "--out", tmp_path / "simcse", "--max-steps", 2,
                             "batch_size=8", "progress=false", "peak_flops=1e11")
    assert code == 0 and "model saved" in out, err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--objective", "contrastive", "--data", sentences,
                           "--out", tmp_path / "x")
    assert code == 1 and "give --model" in err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--objective", "mlm", "--preset", "llama-tiny",
                           "--data", shakespeare_data, "--out", tmp_path / "x")
    assert code == 1 and "not an encoder preset" in err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--objective", "mlm", "--data", shakespeare_data,
                           "--out", tmp_path / "x", "model.pooling=max")
    assert code == 1 and "pooling" in err
    with pytest.raises(LlmkitError, match="unknown model config keys: rope_theta"):
        TrainConfig(objective="mlm", preset="bert-tiny", model={"rope_theta": 1.0})


@pytest.mark.slow
def test_mlm_under_torchrun_follows_the_single_process_run(shakespeare_data, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    small = {"n_layer": 1, "n_embd": 32, "intermediate_size": 64}
    settings = dict(batch_size=8, max_steps=4, lr_decay_steps=4, log_interval=1, eval_iters=2, model=small)
    EncoderTrainer(mlm_config(shakespeare_data, tmp_path / "single", **settings)).fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = mlm_config(shakespeare_data, tmp_path / "ddp", **settings).to_dict()
    overrides = [f"{k}={v}" for k, v in config.items() if k not in ("model", "peak_flops", "threads") and v is not None]
    overrides += [f"model.{k}={v}" for k, v in small.items()] + ["peak_flops=1e11"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "llmkit.cli", "train", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    # same windows and masks; each rank averages over its own masked tokens, so losses agree closely, not exactly
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=0.02)
    model, _ = load_encoder(tmp_path / "ddp")
    assert model.task == "mlm"
