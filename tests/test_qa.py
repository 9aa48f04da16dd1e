"""Extractive QA: SQuAD-style data, overlapping windows, the span head trained for real, EM / F1, commands."""
import json
import random

import pytest

from conftest import run_cli, tiny_encoder_dir, write_jsonl
from llmkit.apps.qa import QAExample, normalize_answer, qa_scores, read_qa, windows
from llmkit.io.encoders import load_encoder
from llmkit.errors import LlmkitError
from llmkit.train.tasks import FinetuneConfig
from llmkit.train.qa import finetune_qa

FILLER = "we walked along the river and talked about books music weather friends and plans for summer".split()
CODES = ["apple", "falcon", "tiger", "violet", "copper", "maple", "harbor", "sierra", "comet", "willow"]
# Stated target: a 2-layer encoder from scratch finds the answer in contexts three windows long
QA_MIN_EXACT_MATCH = 80.0


def cue_data(n: int, seed: int) -> list[dict]:
    """Contexts of ~40 filler words with one "the code is X" sentence at a random place; the question asks for X."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        words = [rng.choice(FILLER) for _ in range(40)]
        at, code = rng.randrange(0, 38), rng.choice(CODES)
        before = " ".join(words[:at])
        context = f"{before} the code is {code}. " + " ".join(words[at:])
        out.append({"id": f"c{k}", "context": context.strip(), "question": "what is the code?",
                    "answers": [{"text": code, "answer_start": context.strip().index(f"code is {code}") + 8}]})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    texts = [r["context"] for r in cue_data(100, seed=9)] + ["what is the code?"]
    return tiny_encoder_dir(tmp_path_factory.mktemp("qa") / "enc", texts, max_position=32)


def test_squad_scores():
    ex = [QAExample("1", "x", "q", [("the Eiffel Tower", 0), ("Eiffel", 0)], "f:1"),
          QAExample("2", "x", "q", [("blue sky", 0)], "f:2")]
    scores = qa_scores(ex, [{"answer": "Eiffel tower!"}, {"answer": "sky blue today"}])
    assert scores["exact_match"] == 50.0  # articles, case and punctuation do not count
    assert scores["f1"] == pytest.approx(100 * (1.0 + 0.8) / 2)  # P 2/3, R 1 -> F1 0.8
    assert normalize_answer("  The  Cat, an apple ") == "cat apple"


def test_windows_cover_long_contexts(base, tmp_path):
    _, tokenizer = load_encoder(base)
    examples = read_qa(write_jsonl(tmp_path / "d.jsonl", cue_data(20, seed=3)))
    wins = windows(tokenizer, examples, 32, stride=8)
    assert len(wins) >= 2 * len(examples)  # ~45-token contexts in 32-token windows
    for i, e in enumerate(examples):
        mine = [w for w in wins if w.example == i and w.target != (0, 0)]
        assert mine, "every answer lies whole inside at least one window"
        for w in mine:
            a, b = w.target
            assert e.context[w.offsets[a][0]: w.offsets[b][1]].strip() == e.answers[0][0]
    with pytest.raises(LlmkitError, match="--stride 30 must be in"):
        windows(tokenizer, examples, 32, stride=30)


@pytest.mark.parametrize("record,message", [
    ({"context": "Paris is big", "question": "q?", "answers": [{"text": "Paris", "answer_start": 3}]},
     r"answer 'Paris' does not match the context at offset 3 \(the context has 'is is' there\)"),
    ({"context": "Paris", "question": "q?", "answers": [{"text": "Paris", "answer_start": 9}]}, "does not match"),
    ({"context": "Paris", "question": "", "answers": []}, "non-empty strings"),
    ({"context": "Paris", "question": "q?"}, "missing 'answers'"),
    ({"context": "Paris", "question": "q?", "answers": [{"text": "Paris"}]}, "'answer_start' >= 0"),
])
def test_bad_qa_data(tmp_path, record, message):
    with pytest.raises(LlmkitError, match=message):
        read_qa(write_jsonl(tmp_path / "d.jsonl", [record]))


def test_span_head_learns_and_eval_scores_it(base, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", cue_data(240, seed=1))
    dev = write_jsonl(tmp_path / "dev.jsonl", cue_data(40, seed=2))
    metrics = finetune_qa(str(base), train, tmp_path / "qa", val_path=dev,
                          config=FinetuneConfig(epochs=4, lr=3e-3, batch_size=16), stride=8, log=lambda _: None)
    assert metrics["exact_match"] >= QA_MIN_EXACT_MATCH, metrics
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "--model", tmp_path / "qa", "--qa", dev, "--json")
    assert code == 0 and json.loads(out)["exact_match"] >= QA_MIN_EXACT_MATCH
    code, _, err = run_cli(monkeypatch, capsys, "predict", dev, "--model", tmp_path / "qa", "-o", tmp_path / "p.jsonl")
    assert code == 0 and f"40 labelled examples: exact_match {metrics['exact_match']:.2f}" in err, err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[0]["question"] == "what is the code?" and rows[0]["answer"] in CODES
    unlabelled = write_jsonl(tmp_path / "q.jsonl", [{"context": "we talked. the code is comet.", "question": "what is "
                                                     "the code?"}])
    code, out, err = run_cli(monkeypatch, capsys, "predict", unlabelled, "--model", tmp_path / "qa")
    assert code == 0 and json.loads(out)["answer"] in CODES and "labelled" not in err
    code, _, err = run_cli(monkeypatch, capsys, "predict", write_jsonl(tmp_path / "pairs.jsonl", [
        {"text": "a", "text_pair": "b"}]), "--model", tmp_path / "qa")
    assert code == 1 and "holds pair examples, but this model has no pair heads (it has answer)" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "abc", "question": "q", "answers": [
        {"text": "abd", "answer_start": 0}]}])
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", tmp_path / "qa", "--qa", bad)
    assert code == 1 and "does not match the context" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", base, "--qa", dev)
    assert code == 1 and "has no span (QA) head" in err
