"""Sentence-pair classification: `finetune --task pair`, `predict` on pairs, and bad pair data."""
import json

import pytest

from conftest import ROOT, booking_texts, run_cli, tiny_encoder_dir, write_jsonl
from llmkit.errors import LlmkitError
from llmkit.train.pair import read_pair_examples

PAIRS_TRAIN = ROOT / "examples" / "data" / "pairs_train.jsonl"
PAIRS_TEST = ROOT / "examples" / "data" / "pairs_test.jsonl"
# Every first text of the example pairs appears once as "same" and once as "different", so a model reading
# one text alone stays at 0.5 (400 test pairs: 0.70 is 8 standard deviations above chance), so this target
# is only reachable by comparing the two texts; the tiny encoder from scratch reaches 0.74
PAIR_MIN_ACCURACY = 0.70


def test_pair_model_learns_and_predicts(tmp_path, monkeypatch, capsys):
    base = tiny_encoder_dir(tmp_path / "base", booking_texts())
    model = tmp_path / "pair"
    code, out, err = run_cli(monkeypatch, capsys, "finetune", PAIRS_TRAIN, "--task", "pair", "--model", base,
                             "--val", PAIRS_TEST, "--epochs", 5, "--lr", 2e-3, "--batch-size", 32, "--out", model)
    assert code == 0 and "epoch 5/5" in err, err
    accuracy = float(out.split("accuracy ")[1].split()[0])
    assert accuracy >= PAIR_MIN_ACCURACY, out
    config = json.loads((model / "config.json").read_text())
    assert config["task"] == "multi" and config["heads"]["pair"] == {"kind": "pair", "labels": ["different", "same"],
                                                                      "weight": 1.0}

    code, _, err = run_cli(monkeypatch, capsys, "predict", PAIRS_TEST, "--model", model, "--out", tmp_path / "p.jsonl")
    assert code == 0 and f"400 labelled examples: accuracy {accuracy:.4f}" in err, err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 400 and {r["label"] for r in rows} == {"same", "different"}

    plain = tmp_path / "pairs.txt"  # prediction input without labels: text<TAB>text_pair lines
    plain.write_text("book a table for 4 at 7pm\treserve a table for two on friday\n"
                     "book a table for 4 at 7pm\tno that is wrong\n")
    code, out, _ = run_cli(monkeypatch, capsys, "predict", plain, "--model", model)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text_pair"] for r in rows] == ["reserve a table for two on friday", "no that is wrong"]
    assert all(r["label"] in ("same", "different") and 0.5 <= r["score"] <= 1 for r in rows)

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "hi", "text_pair": "hello", "label": "maybe"}])
    code, _, err = run_cli(monkeypatch, capsys, "predict", bad, "--model", model, "--out", tmp_path / "bad_out.jsonl")
    assert code == 1 and "unknown label 'maybe'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad_out.jsonl").exists()


@pytest.mark.parametrize("line,message", [
    ({"text": "hi", "label": "same"}, "'text' and 'text_pair' must be non-empty strings"),
    ({"text": "hi", "text_pair": "  ", "label": "same"}, "'text' and 'text_pair' must be non-empty strings"),
    ({"text": "hi", "text_pair": "hello"}, "missing 'label'"),
    ({"text": "hi", "text_pair": "hello", "label": True}, "'label' must be a string"),
    ('{"text": "hi"', "not valid JSON"),
])
def test_bad_pair_data(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [line])
    with pytest.raises(LlmkitError, match=message):
        read_pair_examples(path)


def test_pair_text_lines_need_one_tab(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("only one text\n")
    with pytest.raises(LlmkitError, match=r"d.txt:1: expected text<TAB>text_pair \(one tab\), got 0 tabs"):
        read_pair_examples(path, need_gold=False)
