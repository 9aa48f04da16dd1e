"""Shared helpers for the trainer/evaluation tests: a small synthetic corpus and a tiny config."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from llmkit.cli import main
from llmkit.data import prepare
from llmkit.tokenizer import Tokenizer
from llmkit.train import Trainer, TrainConfig

WORDS = ("the king shall speak of crowns and roses while the queen walks in gardens of stone "
         "to be or not to be that is the question whether tis nobler in the mind").split()


def make_corpus(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_data_dir(root: Path) -> Path:
    corpus = make_corpus(root / "corpus.txt")
    text = corpus.read_text(encoding="utf-8")
    prepare([corpus], root / "data", Tokenizer.train_char([text]), val_fraction=0.1)
    return root / "data"


def trained_tiny_model(root: Path, steps: int = 3, **overrides) -> tuple[Path, Path]:
    """(data dir, model dir) of a tiny model trained for `steps` steps under `root`."""
    data = make_data_dir(root)
    Trainer(tiny_config(data, root / "model", max_steps=steps, **overrides)).fit()
    return data, root / "model"


def tiny_config(data_dir, out_dir, model=None, **overrides) -> TrainConfig:
    """A model small enough that a training step takes milliseconds."""
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), preset="char-tiny",
                model={"n_layer": 2, "n_head": 2, "n_embd": 32, **(model or {})},
                batch_size=4, block_size=16, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                lr_decay_steps=6, eval_interval=3, eval_iters=2, log_interval=1, ckpt_interval=0,
                progress=False, peak_flops=1e11)
    base.update(overrides)
    return TrainConfig(**base)


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `llmkit ARGS...` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["llmkit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err
