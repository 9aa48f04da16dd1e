"""Files written before the package restructure still load, resume and predict the same.

tests/fixtures/pre_restructure/ was written by llmkit at commit c0c5672 (the flat layout): a prepared
char-level data dir, a 4-step training run in the old run-dir layout (train_state.pt beside the model,
no step directories), and a fine-tuned classifier; run_expected.json and clf_expected.jsonl are what
that code computed from them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from conftest import run_cli
from llmkit.io.resolve import resolve_model

FIXTURE = Path(__file__).parent / "fixtures" / "pre_restructure"


def test_old_training_run_loads_with_the_same_logits():
    expected = json.loads((FIXTURE / "run_expected.json").read_text())
    model, tokenizer = resolve_model(FIXTURE / "run")
    ids = tokenizer.encode(expected["text"])
    assert ids == expected["ids"]
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    assert logits[0].argmax(-1).tolist() == expected["argmax"]
    torch.testing.assert_close(logits[0, -1], torch.tensor(expected["last_logits"]), atol=1e-5, rtol=0)


def test_old_training_run_resumes(tmp_path, monkeypatch, capsys):
    run = shutil.copytree(FIXTURE / "run", tmp_path / "run")
    settings = ["data_dir=" + str(FIXTURE / "data"), f"out_dir={run}", "preset=char-tiny", "model.n_layer=1",
                "model.n_embd=16", "model.n_head=2", "block_size=16", "batch_size=4", "eval_interval=2",
                "ckpt_interval=2", "eval_iters=2", "log_interval=1", "device=cpu", "progress=false"]
    code, out, err = run_cli(monkeypatch, capsys, "train", *settings, "max_steps=6", "--resume")
    assert code == 0, err
    assert "step 6:" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and max(steps) == 6 and 5 in steps  # the old log kept, training went on from step 4


def test_old_classifier_predicts_the_same(tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "predict", FIXTURE / "probe.jsonl", "--model", FIXTURE / "clf",
                             "--out", tmp_path / "p.jsonl")
    assert code == 0, err
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (FIXTURE / "clf_expected.jsonl").read_text().splitlines()]
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert all(abs(g["score"] - w["score"]) < 1e-5 for g, w in zip(got, want))
