"""`llmkit eval` tasks: multiple choice by log-likelihood, generation metrics, the table and JSON."""
import json

import pytest
from conftest import run_cli, tiny_model_dir, write_jsonl

from llmkit.io.checkpoint import load_checkpoint
from llmkit.errors import LlmkitError
from llmkit.eval.lm import (loglikelihood, multiple_choice, read_gen_items, read_mc_items, results_table,
                             split_continuation, text_metrics)

MC = [{"question": "capital of zorbia?", "choices": ["quibble", "frobnitz", "paris"], "answer": 0},
      {"question": "the cat sat on the?", "choices": ["mat", "rome"], "answer": "mat"},
      {"question": "yonder?", "choices": ["blue", "green", "berlin"], "answer": 2}]
GEN = [{"prompt": "the cat", "reference": "sat on the mat"},
       {"prompt": "capital of", "reference": ["zorbia is quibble", "paris"]}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("eval") / "model")


def test_text_metrics_known_values():
    perfect = text_metrics(["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    wrong = text_metrics(["zzz qqq"], [["the cat sat"]])
    assert wrong["exact_match"] == 0 and wrong["rouge1"] == 0 and wrong["bleu"] == pytest.approx(0.0, abs=1e-6)
    # several references: an item counts its best one; whitespace differences do not break exact match
    multi = text_metrics(["  paris ", "rome"], [["berlin", "paris"], ["madrid"]])
    assert multi["exact_match"] == 50.0 and multi["rouge1"] == 50.0
    half = text_metrics(["the cat"], [["the cat sat on"]])
    assert half["rouge1"] == pytest.approx(100 * 2 * (1.0 * 0.5) / 1.5)  # P=1, R=1/2


def test_split_continuation_tokenizes_the_joined_text(model_dir):
    _, tok = load_checkpoint(model_dir)
    ctx, cont = split_continuation(tok, "the cat sat on the", " mat")
    assert ctx + cont == tok.encode("the cat sat on the mat")
    assert tok.decode(cont) == " mat"
    ctx, cont = split_continuation(tok, "", "quibble")
    assert ctx == [tok.bos_id] and cont == tok.encode("quibble")


def test_multiple_choice_picks_the_most_likely_choice(model_dir):
    model, tok = load_checkpoint(model_dir)
    items = read_mc_items(write_jsonl(model_dir / "mc.jsonl", MC))
    assert items[1]["answer"] == 0  # answer given as text becomes its index
    result = multiple_choice(model, tok, items, batch_size=2)
    for item, pred in zip(items, result["predictions"]):
        context = f"Question: {item['question']}\nAnswer:"
        expected = [loglikelihood(model, [split_continuation(tok, context, " " + c)])[0][0] for c in item["choices"]]
        assert pred["logprobs"] == pytest.approx(expected, abs=1e-4)  # batching changes nothing
        assert pred["prediction"] == max(range(len(expected)), key=expected.__getitem__)
    hits = sum(p["prediction"] == p["answer"] for p in result["predictions"])
    assert result["acc"] == hits / 3 and result["n"] == 3


def test_cli_eval_table_json_and_output(tmp_path, monkeypatch, capsys, model_dir):
    mc = write_jsonl(tmp_path / "mc.jsonl", MC)
    gen = write_jsonl(tmp_path / "gen.jsonl", GEN)
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. capital of zorbia is quibble.\n" * 4)
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--model", model_dir, "--text", text, "--mc", mc,
                             "--gen", gen, "--max-new-tokens", "4", "--output", tmp_path / "res.json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["task", "source", "loss"] and len(lines) == 5
    assert [line.split()[0] for line in lines[2:]] == ["perplexity", "multiple_choice", "generation"]
    saved = json.loads((tmp_path / "res.json").read_text())
    assert [r["task"] for r in saved] == ["perplexity", "multiple_choice", "generation"]
    gen_result = saved[2]
    outputs = [p["output"] for p in gen_result["predictions"]]
    again = text_metrics(outputs, [[g["reference"]] if isinstance(g["reference"], str) else g["reference"] for g in GEN])
    assert gen_result["bleu"] == pytest.approx(again["bleu"]) and gen_result["rougeL"] == pytest.approx(again["rougeL"])
    code, out, _ = run_cli(monkeypatch, capsys, "eval", "--model", model_dir, "--mc", mc, "--json")
    assert code == 0 and json.loads(out)[0]["acc"] == saved[1]["acc"]


@pytest.mark.parametrize("row, message", [
    ("{not json", "mc.jsonl:2: malformed JSON"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "mc.jsonl:2: 'choices' must be a list of at least two"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, "mc.jsonl:2: 'answer' must be a choice index 0..1"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "mc.jsonl:2: 'answer' must be"),
    ({"choices": ["a", "b"], "answer": 0}, "mc.jsonl:2: expected"),
])
def test_bad_multiple_choice_lines(tmp_path, row, message):
    with pytest.raises(LlmkitError, match=message):
        read_mc_items(write_jsonl(tmp_path / "mc.jsonl", [MC[0], row]))


def test_bad_generation_lines_and_cli_error(tmp_path, monkeypatch, capsys, model_dir):
    with pytest.raises(LlmkitError, match="gen.jsonl:1: 'reference' must be"):
        read_gen_items(write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "p", "reference": []}]))
    code, _, err = run_cli(monkeypatch, capsys, "eval", "--model", model_dir, "--gen", tmp_path / "gen.jsonl")
    assert code == 1 and err.startswith("error: ") and "gen.jsonl:1" in err


def test_results_table_aligns_columns():
    table = results_table([{"task": "a", "source": "x", "acc": 0.5}, {"task": "bb", "source": "y", "bleu": 12.0}])
    header, rule, first, second = table.splitlines()
    assert header.split() == ["task", "source", "acc", "bleu"]
    assert first.split() == ["a", "x", "0.5000", "-"] and second.split() == ["bb", "y", "-", "12.0000"]
    assert set(rule.replace(" ", "")) == {"-"}
