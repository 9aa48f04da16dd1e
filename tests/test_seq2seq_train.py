"""`llmkit prepare --pairs` and `llmkit train --objective seq2seq`: data, loss, schedule, exact resume,
DDP, fine-tuning an imported model, and the one-line refusals."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, train_losses
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.data.pairs import PairData, PairSampler, load_pairs, prepare_pairs
from llmkit.errors import LlmkitError
from llmkit.io.checkpoint import load_checkpoint
from llmkit.tokenizer import Tokenizer
from llmkit.train.config import TrainConfig
from llmkit.train.optim import inverse_sqrt_lr
from llmkit.train.seq2seq import Seq2SeqTrainer, seq2seq_loss

EN = "zero one two three four five six seven eight nine".split()
FR = "zéro un deux trois quatre cinq six sept huit neuf".split()


def write_pairs(path, n=120, seed=0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            k = [rng.randrange(10) for _ in range(rng.randint(1, 5))]
            f.write(json.dumps({"source": " ".join(EN[j] for j in k), "target": " ".join(FR[j] for j in k)}) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    tok = Tokenizer.train_bpe([" ".join(EN), " ".join(FR)] * 20, vocab_size=300)  # a word is about a token
    prepare_pairs([write_pairs(root / "pairs.jsonl")], root / "data", tok, val_fraction=0.1)
    return root / "data"


def config(data_dir, out_dir, **overrides) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), preset="seq2seq-tiny", objective="seq2seq",
                model={"n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "dropout": 0.1},
                batch_size=8, block_size=48, max_steps=6, lr=3e-3, warmup_steps=2, lr_schedule="inverse_sqrt",
                label_smoothing=0.1, eval_interval=3, log_interval=1, ckpt_interval=0, progress=False,
                peak_flops=1e11)
    base.update(overrides)
    return TrainConfig(**base)


def test_prepare_pairs_layout(pairs_dir):
    meta = json.loads((pairs_dir / "meta.json").read_text())
    assert meta["format"] == "pairs" and meta["pairs"] == {"train": 108, "val": 12}
    tok = Tokenizer.load(pairs_dir / "tokenizer.json")
    train = load_pairs(pairs_dir, "train")
    assert len(train) == 108
    src, tgt = train.src[0].tolist(), train.tgt[0].tolist()
    assert src[-1] == tok.eos_id and tgt[0] == tok.bos_id and tgt[-1] == tok.eos_id
    assert tok.decode(src[:-1]).split()[0] in EN and tok.decode(tgt[1:-1]).split()[0] in FR


@pytest.mark.parametrize("line, message", [
    ('{"source": "one", "target": "  "}', "target is empty"),
    ('{"source": "", "target": "un"}', "source is empty"),
    ('{"source": "one"}', 'with "source" and "target"'),
    ('not json', "not valid JSON"),
])
def test_bad_pair_lines_are_one_line_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"source": "one", "target": "un"}\n' + line + "\n")
    result = CliRunner().invoke(app, ["prepare", "--pairs", str(path), "--out", str(tmp_path / "d"), "--tokenizer", "char"])
    assert result.exit_code != 0 and isinstance(result.exception, LlmkitError)
    assert "bad.jsonl:2: " in str(result.exception) and message in str(result.exception)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_loss_is_label_smoothed_teacher_forcing(pairs_dir, tmp_path):
    trainer = Seq2SeqTrainer(config(pairs_dir, tmp_path / "r", model={"n_layer": 1, "n_head": 2, "n_embd": 32,
                                                                       "intermediate_size": 64, "dropout": 0.0}))
    x, y = PairSampler(trainer.train_tokens, 4, 0).next_batch()
    model = trainer.raw_model.eval()
    logits, _ = model(x.clamp(min=0), y[:, :-1].clamp(min=0), src_mask=x >= 0)
    keep = y[:, 1:] >= 0
    expected = F.cross_entropy(logits[keep], y[:, 1:][keep], label_smoothing=0.1)
    assert torch.allclose(seq2seq_loss(model, x, y, 0.1), expected, atol=1e-6)
    # the schedule: linear warmup to the peak, then lr * sqrt(warmup / step)
    assert [round(inverse_sqrt_lr(s, 1.0, 4), 4) for s in (0, 3, 15)] == [0.25, 1.0, 0.5]


def test_batches_group_pairs_of_similar_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 41, size=2000)

    def padded(order):  # tokens in batches of 16, each padded to its longest pair
        return sum(lengths[b].max() * len(b) for b in order.reshape(-1, 16))

    data = PairData([np.zeros(n, np.int32) for n in lengths], [np.zeros(2, np.int32) for _ in lengths])
    sampler = PairSampler(data, 16, seed=3)
    order = sampler._order()
    assert len(order) == len(set(order.tolist())) == 2000 // 16 * 16   # each pair at most once an epoch
    assert padded(order) < 0.6 * padded(rng.permutation(2000)[:len(order)])
    again = PairSampler(data, 16, seed=3)
    assert np.array_equal(again._order(), order)                         # (seed, epoch) decide the order
    for _ in range(len(order) // 16 + 1):
        sampler.next_batch()
    assert sampler.epoch == 1 and not np.array_equal(sampler._order(), order)


def test_resume_reproduces_uninterrupted_run(pairs_dir, tmp_path):
    straight = Seq2SeqTrainer(config(pairs_dir, tmp_path / "straight"))
    straight.fit()
    Seq2SeqTrainer(config(pairs_dir, tmp_path / "split", max_steps=3)).fit()
    resumed = Seq2SeqTrainer(config(pairs_dir, tmp_path / "split"), resume=True)
    assert resumed.step == 3
    resumed.fit()
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    for name, tensor in straight.raw_model.state_dict().items():
        torch.testing.assert_close(resumed.raw_model.state_dict()[name], tensor, atol=1e-6, rtol=0)
    model, _ = load_checkpoint(tmp_path / "split")
    assert model.arch == "seq2seq"


def test_refusals_are_one_line(pairs_dir, tmp_path):
    with pytest.raises(LlmkitError, match="decoder-only or encoder model; --objective seq2seq needs"):
        Seq2SeqTrainer(config(pairs_dir, tmp_path / "a", preset="char-tiny", model={}))
    with pytest.raises(LlmkitError, match="block_size is 8: drop or shorten"):
        Seq2SeqTrainer(config(pairs_dir, tmp_path / "b", block_size=8))
    decoder_dir = tmp_path / "dec"
    from conftest import make_tiny_model
    make_tiny_model(decoder_dir)
    with pytest.raises(LlmkitError, match="is a decoder-only model; --objective seq2seq needs an encoder-decoder"):
        Seq2SeqTrainer(config(pairs_dir, tmp_path / "c"), model=str(decoder_dir))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "meta.json").write_text(json.dumps({"dtype": "uint16", "train_tokens": 0, "val_tokens": 0}))
    with pytest.raises(LlmkitError, match="holds plain text"):
        Seq2SeqTrainer(config(plain, tmp_path / "d"))


def test_long_source_is_refused_by_generate_and_eval(pairs_dir, tmp_path):
    """A source longer than the encoder's context is refused in one line naming it, never truncated
    (training refuses such pairs the same way, above)."""
    from llmkit.io.checkpoint import save_checkpoint
    from llmkit.model.seq2seq import Seq2Seq, seq2seq_preset

    tok = Tokenizer.load(pairs_dir / "tokenizer.json")
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=tok.vocab_size, block_size=6, n_layer=1, n_embd=32,
                                   n_head=2, intermediate_size=64, pad_id=tok.pad_id, eos_id=tok.eos_id,
                                   decoder_start_id=tok.bos_id))
    save_checkpoint(tmp_path / "m", model, tok)
    long = " ".join(EN)  # ten words: more than 6 tokens with the end token
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "one", "reference": "un"}) + "\n"
                                        + json.dumps({"prompt": long, "reference": "x"}) + "\n")
    for args in (["generate", "--model", str(tmp_path / "m"), long, "--max-new-tokens", "3"],
                 ["eval", "--model", str(tmp_path / "m"), "--gen", str(tmp_path / "gen.jsonl"), "--max-new-tokens", "3"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and isinstance(result.exception, LlmkitError), result.output
        message = str(result.exception)
        assert "more than the encoder's context of 6" in message and "\n" not in message
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "m"), "one two", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output


def test_seq2seq_generate_is_greedy_unless_beams_are_asked_for(pairs_dir, monkeypatch):
    """generate() on a seq2seq model without beam options decodes greedily (one beam), as for decoders."""
    from llmkit.infer import beam
    from llmkit.infer.generate import generate
    from llmkit.model.seq2seq import Seq2Seq, seq2seq_preset

    tok = Tokenizer.load(pairs_dir / "tokenizer.json")
    torch.manual_seed(0)
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=tok.vocab_size, n_layer=1, n_embd=32, n_head=2,
                                   intermediate_size=64, pad_id=tok.pad_id, eos_id=tok.eos_id,
                                   decoder_start_id=tok.bos_id)).eval()
    asked = []
    real = beam.generate_beams
    monkeypatch.setattr(beam, "generate_beams", lambda *a: asked.append(a[-1].num_beams) or real(*a))
    greedy = generate(model, tok, "one two", max_new_tokens=5)
    assert generate(model, tok, "one two", max_new_tokens=5, num_beams=1) == greedy
    generate(model, tok, "one two", max_new_tokens=5, num_beams=3)
    assert asked == [1, 1, 3]


def test_fine_tunes_an_imported_model_and_translates(pairs_dir, tmp_path):
    """Train from scratch long enough to learn the toy mapping, export to HF Marian, fine-tune that
    directory further through --model, and translate with greedy and beam search."""
    runner = CliRunner()
    out = tmp_path / "m"
    args = ["train", "--objective", "seq2seq", "--preset", "seq2seq-tiny", "--data", str(pairs_dir), "--out", str(out),
            "--max-steps", "250", "batch_size=16", "block_size=48", "lr=4e-3", "warmup_steps=20", "lr_decay_steps=2000",
            "model.n_layer=1", "model.n_embd=64", "model.intermediate_size=128", "model.sinusoid_halves=true",
            "model.dropout=0.0", "label_smoothing=0.1", "eval_interval=0", "progress=false"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(out), str(tmp_path / "hf"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    tuned = tmp_path / "tuned"
    result = runner.invoke(app, ["train", "--objective", "seq2seq", "--model", str(tmp_path / "hf"), "--data",
                                 str(pairs_dir), "--out", str(tuned), "--max-steps", "20", "batch_size=16",
                                 "block_size=48", "lr=1e-3", "warmup_steps=2", "lr_decay_steps=2000", "eval_interval=10",
                                 "progress=false"])
    assert result.exit_code == 0, result.output
    vals = [r["val_loss"] for r in read_metrics(tuned) if "val_loss" in r]
    assert vals[-1] < 0.5
    for beams in ("1", "3"):
        result = runner.invoke(app, ["generate", "--model", str(tuned), "three one four", "--no-echo",
                                     "--max-new-tokens", "20", "--num-beams", beams])
        assert result.exit_code == 0 and result.output.strip() == "trois un quatre", result.output


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    root = tmp_path
    # every pair has the same length, so each rank's token-mean loss weighs the batch as one process does
    rng = random.Random(0)
    words = [" ".join("".join(rng.choice("abcdef") for _ in range(3)) for _ in range(3)) for _ in range(64)]
    (root / "p.jsonl").write_text("".join(json.dumps({"source": w, "target": w[::-1].upper()}) + "\n" for w in words))
    prepare_pairs([root / "p.jsonl"], root / "data", Tokenizer.train_char(["abcdef ABCDEF"]))
    settings = dict(batch_size=8, grad_accum=2, max_steps=3, eval_interval=3, log_interval=1)
    nodrop = {"n_layer": 1, "n_head": 2, "n_embd": 32, "intermediate_size": 64, "dropout": 0.0}
    Seq2SeqTrainer(config(root / "data", root / "single", model=nodrop, **settings)).fit()
    overrides = [f"{k}={v}" for k, v in settings.items()] + [f"model.{k}={v}" for k, v in nodrop.items()] + [
        f"data_dir={root / 'data'}", f"out_dir={root / 'ddp'}", "preset=seq2seq-tiny", "objective=seq2seq",
        "block_size=48", "lr=3e-3", "warmup_steps=2", "lr_schedule=inverse_sqrt", "label_smoothing=0.1",
        "ckpt_interval=0", "progress=false", "peak_flops=1e11"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    from test_ddp import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "llmkit.cli", "train", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, ddp = read_metrics(root / "single"), read_metrics(root / "ddp")
    for a, b in zip(single, ddp):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
