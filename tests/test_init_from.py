"""Continued pretraining: `llmkit train --init-from MODEL` starts from the model's weights, config and
tokenizer (llmkit and Hugging Face directories here; GGUF and the embedded SmolLM2 go through the
same loader, see examples/continued_pretraining.py), and refuses data prepared with another tokenizer."""
from __future__ import annotations

import pytest
from conftest import make_corpus, read_metrics, run_cli, tiny_config, trained_tiny_model

from llmkit.io.checkpoint import load_checkpoint
from llmkit.data.corpus import prepare
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from llmkit.train.trainer import Trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return trained_tiny_model(tmp_path_factory.mktemp("init-from"), eval_interval=3)


def val_losses(out) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}


@pytest.mark.parametrize("kind", ["llmkit", "hf"])
def test_init_from_starts_at_the_model_and_keeps_its_config(base, tmp_path, monkeypatch, capsys, kind):
    data, base_dir = base
    source = base_dir
    if kind == "hf":
        assert run_cli(monkeypatch, capsys, "convert", base_dir, tmp_path / "hf", "--to", "hf")[0] == 0
        source = tmp_path / "hf"
    # another preset and size on the command line: the model's own config wins
    trainer = Trainer(tiny_config(data, tmp_path / "cont", init_from=str(source), preset="llama-tiny",
                                  model={}, max_steps=5, eval_interval=5))
    if kind == "llmkit":  # (the GPT-2-family HF export stores zero biases: same function, other flags)
        assert trainer.model_config == load_checkpoint(base_dir)[0].config
    assert trainer.evaluate() == pytest.approx(val_losses(base_dir)[3], abs=1e-5)  # the same model
    trainer.fit()
    assert val_losses(tmp_path / "cont")[5] < val_losses(base_dir)[3]  # and it keeps learning
    model, tok = load_checkpoint(tmp_path / "cont")
    assert model.config == trainer.model_config and tok.decode(tok.encode("the king")) == "the king"


def test_init_from_refuses_data_of_another_tokenizer(base, tmp_path, monkeypatch, capsys):
    _, base_dir = base
    corpus = make_corpus(tmp_path / "other.txt", seed=1)
    other = Tokenizer.train_char(["xyz " + corpus.read_text(encoding="utf-8")])  # one more character
    prepare([corpus], tmp_path / "data", other, val_fraction=0.1)
    with pytest.raises(LlmkitError, match="not prepared with the tokenizer of .*--tokenizer"):
        Trainer(tiny_config(tmp_path / "data", tmp_path / "out", init_from=str(base_dir)))
    # prepare --tokenizer MODEL takes the model's tokenizer, and then training starts
    code, _, err = run_cli(monkeypatch, capsys, "prepare", corpus, "--out", tmp_path / "data2",
                           "--tokenizer", base_dir)
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "train", f"data_dir={tmp_path / 'data2'}", "block_size=16",
                           "batch_size=2", "eval_interval=0", "progress=false", "peak_flops=1e11",
                           "--init-from", base_dir, "--out", tmp_path / "out", "--max-steps", "1")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--objective", "mlm", f"data_dir={tmp_path / 'data2'}",
                           "--init-from", base_dir, "--out", tmp_path / "enc")
    assert code == 1 and "init_from is for decoder training" in err
