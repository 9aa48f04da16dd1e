"""Multi-task encoder heads, the joint intent-slots recipe and its finetune / predict commands."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import BOOKING_TEST, BOOKING_TRAIN, joint_model
from conftest import run_cli, write_jsonl
from llmkit.io.encoders import load_encoder, save_encoder
from llmkit.errors import LlmkitError
from llmkit.model.encoder import EncoderConfig
from llmkit.model.heads import MultiTaskEncoder, check_heads
from llmkit.tokenizer import Tokenizer

# Stated targets of the tiny joint model (2 layers, 64 wide, from scratch) on the booking test set,
# a quarter of which uses phrasings never seen in training
JOINT_MIN_INTENT_ACCURACY = 0.80
JOINT_MIN_SLOT_F1 = 0.60

HEADS = {"intent": {"kind": "classify", "labels": ["a", "b", "c"], "weight": 0.5},
         "pair": {"kind": "pair", "labels": ["yes", "no"], "weight": 2.0},
         "slots": {"kind": "tag", "labels": ["O", "B-x", "I-x"]},
         "answer": {"kind": "span", "weight": 0.0}}


def _model():
    torch.manual_seed(0)
    return MultiTaskEncoder(EncoderConfig(vocab_size=50, max_position=16, n_layer=1, n_head=2, n_embd=16,
                                          dropout=0.0), HEADS).eval()


def test_heads_shapes_and_weighted_loss():
    model = _model()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 5:] = False
    types = torch.tensor([[0] * 4 + [1] * 3] * 3)
    targets = {"intent": torch.tensor([0, 2, 1]), "pair": torch.tensor([1, 0, 1]),
               "slots": torch.randint(0, 3, (3, 7)), "answer": torch.tensor([[1, 3], [0, 0], [2, 4]])}
    targets["slots"][2, 5:] = -100
    out, loss = model(ids, mask, types, targets)
    assert out["intent"].shape == (3, 3) and out["pair"].shape == (3, 2)
    assert out["slots"].shape == (3, 7, 3) and out["answer"].shape == (3, 7, 2)
    assert (out["answer"][2, 5:] < -1e30).all()  # padding can never be an answer
    expected = (0.5 * F.cross_entropy(out["intent"], targets["intent"])
                + 2.0 * F.cross_entropy(out["pair"], targets["pair"])
                + F.cross_entropy(out["slots"].flatten(0, 1), targets["slots"].flatten(), ignore_index=-100))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # weight 0: the span head gets no gradient, the others do
    assert model.heads["answer"].weight.grad.abs().max() == 0
    assert model.heads["intent"].weight.grad.abs().max() > 0
    _, only_intent = model(ids, mask, types, {"intent": targets["intent"]})  # heads without targets add nothing
    assert only_intent.item() == pytest.approx(0.5 * F.cross_entropy(out["intent"], targets["intent"]).item(), rel=1e-5)


def test_multitask_model_round_trips(tmp_path):
    model = _model()
    tokenizer = Tokenizer.train_bpe(["a b c d e f g"] * 5, vocab_size=300)
    save_encoder(tmp_path / "m", model, tokenizer)
    loaded, _ = load_encoder(tmp_path / "m")
    assert isinstance(loaded, MultiTaskEncoder) and loaded.head_specs == model.head_specs
    ids = torch.randint(1, 50, (2, 5))
    a, b = model(ids)[0], loaded(ids)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("heads,message", [
    ({}, "at least one head"),
    ({"x": {"kind": "regress", "labels": ["a", "b"]}}, "unknown kind 'regress'"),
    ({"x": {"kind": "tag", "labels": ["O"]}}, "at least 2 labels"),
    ({"x": {"kind": "span", "weight": -1}}, "loss weight must be >= 0"),
])
def test_bad_heads(heads, message):
    with pytest.raises(LlmkitError, match=message):
        check_heads(heads)


def test_joint_model_reaches_stated_scores():
    _, metrics = joint_model()
    assert metrics["intent_accuracy"] >= JOINT_MIN_INTENT_ACCURACY, metrics
    assert metrics["slot_f1"] >= JOINT_MIN_SLOT_F1, metrics


def test_predict_command_gives_intent_and_slots(tmp_path, monkeypatch, capsys):
    model, _ = joint_model()
    code, _, err = run_cli(monkeypatch, capsys, "predict", BOOKING_TEST, "--model", model, "--out", tmp_path / "p.jsonl")
    assert code == 0 and "200 labelled examples: intent_accuracy" in err and "slot_f1" in err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["tags"]) == len(r["tokens"]) and r["intent"] for r in rows)
    plain = tmp_path / "plain.txt"
    plain.write_text("book a table for 4 on friday at 7pm\n")
    code, out, _ = run_cli(monkeypatch, capsys, "predict", plain, "--model", model)
    row = json.loads(out)
    assert code == 0 and row["intent"] == "book_table"
    assert row["slots"] == {"people": "4", "day": "friday", "time": "7pm"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tokens": ["hi"], "tags": ["O"], "label": "order_pizza"}) + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "predict", bad, "--model", model, "--out", tmp_path / "bad_out.jsonl")
    assert code == 1 and "unknown label 'order_pizza'" in err and not (tmp_path / "bad_out.jsonl").exists()


def test_finetune_intent_slots_command(tmp_path, monkeypatch, capsys):
    model, _ = joint_model()
    small = tmp_path / "small.jsonl"
    small.write_text("".join(BOOKING_TRAIN.read_text().splitlines(keepends=True)[:60]))
    code, out, err = run_cli(monkeypatch, capsys, "finetune", small, "--task", "intent-slots", "--model", model,
                             "--out", tmp_path / "again", "--epochs", 1, "--lr", 1e-3)
    assert code == 0 and "intent_accuracy" in out and "slot_f1" in out and "epoch 1/1" in err, err
    assert json.loads((tmp_path / "again" / "config.json").read_text())["heads"]["slots"]["kind"] == "tag"
    small.write_text(json.dumps({"tokens": ["hi"], "tags": ["O"]}) + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "finetune", small, "--task", "intent-slots", "--model", model,
                           "--out", tmp_path / "x")
    assert code == 1 and "missing 'label'" in err and len(err.strip().splitlines()) == 1


# ---- several tasks' heads trained jointly from a mixture file (train/joint.py) -----------------------------

# Stated targets of the tiny encoder trained jointly on the booking intent-slots data and the pair data (6 epochs):
# it reaches intent 0.85, slot F1 0.56, pair accuracy 0.80 (alone: 0.91 / 0.73 and 0.74); a model reading one
# text of a pair alone stays at 0.5
MIXED_MIN_INTENT_ACCURACY, MIXED_MIN_SLOT_F1, MIXED_MIN_PAIR_ACCURACY = 0.80, 0.45, 0.70
PAIRS_TRAIN, PAIRS_TEST = (str(BOOKING_TRAIN.parent / f"pairs_{split}.jsonl") for split in ("train", "test"))


def test_mixed_batch_trains_each_head_on_its_rows_only():
    from llmkit.train.joint import mixed_batch

    model = _model()
    rows = [([3, 4, 5, 6, 7], None, {"intent": 1, "slots": [-100, 1, 2, 0, -100]}),      # intent-slots
            ([3, 9, 10, 2, 11, 12, 2], [0, 0, 0, 0, 1, 1, 1], {"pair": 0}),                # pair
            ([3, 13, 2, 14, 15, 16], [0, 0, 0, 1, 1, 1], {"answer": (3, 4)})]              # qa window
    batch = mixed_batch(rows, [0, 1, 2], model.head_specs, pad_id=0)
    t = batch["targets"]
    assert t["intent"].tolist() == [1, -100, -100] and t["pair"].tolist() == [-100, 0, -100]
    assert t["answer"].tolist() == [[-100, -100], [-100, -100], [3, 4]]
    assert t["slots"][0, :5].tolist() == [-100, 1, 2, 0, -100] and (t["slots"][1:] == -100).all()
    assert batch["token_type_ids"][0].tolist() == [0] * 7 and batch["token_type_ids"][1].tolist() == rows[1][1]
    _, loss = model(**batch)
    expected = 0.0  # each row alone, unpadded: the mixed batch's loss is the weighted sum of its heads' losses
    for ids, types, targets in rows:
        ids = torch.tensor([ids])
        out, _ = model(ids, token_type_ids=None if types is None else torch.tensor([types]))
        for name, target in targets.items():
            kind, weight = model.head_specs[name]["kind"], model.head_specs[name]["weight"]
            if kind == "tag":
                term = F.cross_entropy(out[name][0], torch.tensor(target), ignore_index=-100)
            elif kind == "span":
                term = (F.cross_entropy(out[name][0, :, 0], torch.tensor(target[0]))
                        + F.cross_entropy(out[name][0, :, 1], torch.tensor(target[1]))) / 2
            else:
                term = F.cross_entropy(out[name], torch.tensor([target]))
            expected += weight * term.item()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    only_pair = mixed_batch(rows, [1], model.head_specs, pad_id=0)
    assert set(only_pair["targets"]) == {"pair"}  # heads no row trains are left out, never a NaN mean


def _mixture(path, parts) -> str:
    import yaml

    path.write_text(yaml.safe_dump({"parts": parts}))
    return path


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory):
    from conftest import booking_texts, tiny_encoder_dir

    root = tmp_path_factory.mktemp("mixed")
    base = tiny_encoder_dir(root / "base", booking_texts())
    mixture = _mixture(root / "mix.yaml", [
        {"task": "intent-slots", "train": str(BOOKING_TRAIN), "val": str(BOOKING_TEST)},
        {"task": "pair", "train": PAIRS_TRAIN, "val": PAIRS_TEST, "weight": 1.0}])
    return base, mixture, root / "model"


def test_heads_trained_jointly_reach_stated_scores(mixed_model, monkeypatch, capsys):
    base, mixture, model = mixed_model
    code, _, err = run_cli(monkeypatch, capsys, "finetune", mixture, "--task", "multi", "--model", base,
                           "--out", model, "--val", BOOKING_TEST)
    assert code == 1 and "each part's validation file from the mixture file" in err
    code, out, err = run_cli(monkeypatch, capsys, "finetune", mixture, "--task", "multi", "--model", base,
                             "--out", model, "--epochs", 6, "--lr", 3e-3, "--batch-size", 16)
    assert code == 0 and "epoch 6/6" in err, err
    scores = dict(zip(out.split()[0:6:2], map(float, out.split(";")[0].split()[1::2])))
    assert scores["intent-slots/intent_accuracy"] >= MIXED_MIN_INTENT_ACCURACY, out
    assert scores["intent-slots/slot_f1"] >= MIXED_MIN_SLOT_F1, out
    assert scores["pair/accuracy"] >= MIXED_MIN_PAIR_ACCURACY, out
    config = json.loads((model / "config.json").read_text())
    assert {name: spec["kind"] for name, spec in config["heads"].items()} == {
        "intent": "classify", "slots": "tag", "pair": "pair"}

    # one model, both tasks: `predict` reads pairs as pairs and utterances as intent + slots
    code, _, err = run_cli(monkeypatch, capsys, "predict", PAIRS_TEST, "--model", model)
    assert code == 0 and f"400 labelled examples: accuracy {scores['pair/accuracy']:.4f}" in err, err
    code, out, err = run_cli(monkeypatch, capsys, "predict", BOOKING_TEST, "--model", model)
    assert code == 0 and f"intent_accuracy {scores['intent-slots/intent_accuracy']:.4f}" in err, err
    assert "slots" in json.loads(out.splitlines()[0])
    qa = write_jsonl(model.parent / "qa.jsonl", [{"context": "Casa Verde opens at 6pm.", "question": "When?"}])
    code, _, err = run_cli(monkeypatch, capsys, "predict", qa, "--model", model)
    assert code == 1 and "holds qa examples, but this model has no qa heads (it has intent, slots, pair)" in err


@pytest.mark.parametrize("parts,message", [
    ([], "'parts' must be a non-empty list"),
    ([{"task": "summarize", "train": "x"}], "task must be one of intent-slots, pair, qa, got 'summarize'"),
    ([{"task": "pair", "train": "nowhere.jsonl"}], "train file 'nowhere.jsonl' not found"),
    ([{"task": "pair", "train": PAIRS_TRAIN, "weight": -1}], "weight must be a number >= 0"),
    ([{"task": "pair", "train": PAIRS_TRAIN, "stride": 8}], "for task qa only"),
    ([{"task": "pair", "train": PAIRS_TRAIN, "label": "x"}], "unknown key 'label'"),
    ([{"task": "pair", "train": PAIRS_TRAIN}] * 2, "task 'pair' is listed twice"),
])
def test_bad_mixture_files(tmp_path, monkeypatch, capsys, parts, message):
    mixture = _mixture(tmp_path / "mix.yaml", parts)
    code, _, err = run_cli(monkeypatch, capsys, "finetune", mixture, "--task", "multi", "--model", "x",
                           "--out", tmp_path / "out")
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
