"""Multi-task encoder heads, the joint intent-slots recipe and its finetune / predict commands."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import BOOKING_TEST, BOOKING_TRAIN, joint_model
from conftest import run_cli
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
