"""Fine-tuning (classify, tag), metrics, prediction and the embed / finetune / predict commands."""
import json

import numpy as np
import pytest

from conftest import intent_data, run_cli, slot_data, tiny_encoder_dir, write_jsonl
from llmkit.errors import LlmkitError
from llmkit.eval.metrics import accuracy, bio_spans, entity_scores, macro_f1
from llmkit.train.optim import linear_lr
from llmkit.train.tasks import ExampleSampler, FinetuneConfig, finetune, read_examples

# Stated targets on the held-out split of the synthetic data (a tiny encoder from scratch, a few epochs)
CLASSIFY_MIN_ACCURACY = 0.90
TAG_MIN_ENTITY_F1 = 0.85


# ---- metrics ------------------------------------------------------------------------------------

def test_bio_spans_follow_conlleval():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 2), ("LOC", 3, 4)]
    assert bio_spans(["I-PER", "I-PER", "B-PER"]) == [("PER", 0, 2), ("PER", 2, 3)]  # I- may open an entity
    assert bio_spans(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 3)]  # type change splits
    assert bio_spans(["O", "O"]) == []


def test_entity_scores_are_exact_match_micro_f1():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # PER span is cut short: wrong
    s = entity_scores(gold, pred)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["per_type_f1"] == {"LOC": 1.0, "ORG": 1.0, "PER": 0.0}
    assert entity_scores(gold, gold)["f1"] == 1.0


def test_accuracy_and_macro_f1():
    gold, pred = ["a", "a", "a", "b"], ["a", "a", "a", "a"]
    assert accuracy(gold, pred) == 0.75
    assert macro_f1(gold, pred) == pytest.approx((6 / 7 + 0.0) / 2)  # F1(a) = 2*.75*1/1.75, F1(b) = 0
    with pytest.raises(ValueError):
        accuracy(["a"], [])


# ---- data ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,content,message", [
    ("classify", '{"text": "hi", "label": "x"}\n\n', ":2: empty line"),
    ("classify", '{"text": "hi", "label": "x"}\n{"text": "hi"\n', ":2: not valid JSON"),
    ("classify", '{"text": "", "label": "x"}\n', "non-empty string"),
    ("classify", '{"text": "hi"}\n', "missing 'label'"),
    ("tag", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "2 tokens but 1 tags"),
    ("tag", '{"tokens": [], "tags": []}\n', "non-empty list"),
    ("classify", "", "is empty"),
])
def test_bad_data_files(tmp_path, task, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(LlmkitError, match=message):
        read_examples(path, task)


# ---- fine-tuning --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    texts = [r["text"] for r in intent_data(300, seed=0)]
    return tiny_encoder_dir(root / "enc", texts)


def test_classifier_reaches_stated_accuracy(base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", intent_data(300, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", intent_data(100, seed=2))
    metrics = finetune(str(base), train, tmp_path / "clf", "classify", val_path=test,
                       config=FinetuneConfig(epochs=6, lr=3e-3, batch_size=16), log=lambda _: None)
    assert metrics["accuracy"] >= CLASSIFY_MIN_ACCURACY, metrics
    assert metrics["macro_f1"] >= CLASSIFY_MIN_ACCURACY - 0.05
    saved = json.loads((tmp_path / "clf" / "labels.json").read_text())
    assert saved == {"task": "classify", "labels": ["alarm", "flight", "food", "music", "weather"]}
    # the Trainer's log: one record per epoch with the task metrics, the train loss falling
    epochs = [r for r in map(json.loads, (tmp_path / "clf" / "metrics.jsonl").read_text().splitlines()) if "epoch" in r]
    assert [r["epoch"] for r in epochs] == list(range(1, 7))
    assert epochs[-1]["accuracy"] == metrics["accuracy"] and epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_example_sampler_epochs_and_ranks():
    seen = []
    one = ExampleSampler(10, 4, lambda rows: rows, seed=3)
    assert one.batches_per_epoch() == 3  # 4 + 4 + a short batch of 2
    epoch = [one.next_batch()[0] for _ in range(3)]
    assert sorted(i for b in epoch for i in b) == list(range(10)) and [len(b) for b in epoch] == [4, 4, 2]
    state = one.state_dict()
    after = [one.next_batch()[0] for _ in range(4)]
    again = ExampleSampler(10, 4, lambda rows: rows, seed=3)
    again.load_state_dict(state)
    assert [again.next_batch()[0] for _ in range(4)] == after  # resume replays the same batches
    # two ranks split each global batch; a tail of one example cannot be split and is dropped
    ranks = [ExampleSampler(9, 4, lambda rows: rows, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch() == 2
    for _ in range(2):
        halves = [r.next_batch()[0] for r in ranks]
        assert len(halves[0]) == len(halves[1]) == 2 and not set(halves[0]) & set(halves[1])
        seen += halves[0] + halves[1]
    assert len(set(seen)) == 8
    assert linear_lr(0, 1.0, 2, 10) == 0.5 and linear_lr(2, 1.0, 2, 10) == 1.0 and linear_lr(10, 1.0, 2, 10) == 0.0


def test_tagger_reaches_stated_entity_f1(base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", slot_data(300, seed=1))
    test = write_jsonl(tmp_path / "test.jsonl", slot_data(100, seed=2))
    metrics = finetune(str(base), train, tmp_path / "tag", "tag", val_path=test,
                       config=FinetuneConfig(epochs=8, lr=3e-3, batch_size=16), log=lambda _: None)
    assert metrics["entity_f1"] >= TAG_MIN_ENTITY_F1, metrics
    labels = json.loads((tmp_path / "tag" / "labels.json").read_text())["labels"]
    assert labels[0] == "O" and "B-city" in labels


def test_unknown_validation_label_is_an_error(base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", intent_data(40, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "hello there", "label": "greeting"}])
    with pytest.raises(LlmkitError, match=r"val.jsonl:1: unknown label 'greeting'"):
        finetune(str(base), train, tmp_path / "out", "classify", val_path=val, log=lambda _: None)
    assert not (tmp_path / "out").exists()


# ---- commands -----------------------------------------------------------------------------------

def test_finetune_and_predict_commands(base, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", slot_data(120, seed=4))
    code, out, err = run_cli(monkeypatch, capsys, "finetune", train, "--task", "tag", "--model", base,
                             "--out", tmp_path / "tagger", "--epochs", 2, "--lr", 3e-3)
    assert code == 0 and "entity_f1" in out and "epoch 2/2" in err, err
    test = write_jsonl(tmp_path / "test.jsonl", slot_data(20, seed=5))
    code, _, err = run_cli(monkeypatch, capsys, "predict", test, "--model", tmp_path / "tagger",
                           "--out", tmp_path / "pred.jsonl")
    assert code == 0 and "20 labelled examples: entity_f1" in err
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 20 and all(len(p["tags"]) == len(p["tokens"]) for p in preds)

    plain = tmp_path / "plain.txt"
    plain.write_text("fly me to paris tomorrow\nplay " + " ".join(["halo"] * 80) + "\n")
    code, out, err = run_cli(monkeypatch, capsys, "predict", plain, "--model", tmp_path / "tagger")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines[1]["tags"]) == 81  # words past the limit still get a tag ("O")
    assert err.count("truncated") == 1

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["to", "oslo"], "tags": ["O", "B-planet"]}])
    code, _, err = run_cli(monkeypatch, capsys, "predict", bad, "--model", tmp_path / "tagger",
                           "--out", tmp_path / "bad_pred.jsonl")
    assert code == 1 and "unknown label 'B-planet'" in err and not (tmp_path / "bad_pred.jsonl").exists()

    code, _, err = run_cli(monkeypatch, capsys, "predict", test, "--model", base)
    assert code == 1 and "has no classify/tag head" in err
    code, _, err = run_cli(monkeypatch, capsys, "finetune", train, "--task", "summarise", "--model", base,
                           "--out", tmp_path / "x")
    assert code == 1 and "unknown --task 'summarise'" in err


def test_embed_command(base, tmp_path, monkeypatch, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("book a flight to oslo\nplay halo\n" + "word " * 100 + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "embed", "--model", base, texts, "-o", tmp_path / "e.npy")
    vectors = np.load(tmp_path / "e.npy")
    assert code == 0 and vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert err.count("truncated") == 1 and "1 of 3 texts" in err
    code, _, _ = run_cli(monkeypatch, capsys, "embed", "--model", base, texts, "-o", tmp_path / "e.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == texts.read_text().splitlines()
    assert np.allclose(np.array([r["embedding"] for r in rows]), vectors, atol=1e-6)

    texts.write_text("one\n\nthree\n")
    code, _, err = run_cli(monkeypatch, capsys, "embed", "--model", base, texts, "-o", tmp_path / "new.npy")
    assert code == 1 and "t.txt:2: empty line" in err and not (tmp_path / "new.npy").exists()
    code, _, err = run_cli(monkeypatch, capsys, "embed", "--model", base, texts, "-o", tmp_path / "e.csv")
    assert code == 1 and ".jsonl or .npy" in err
