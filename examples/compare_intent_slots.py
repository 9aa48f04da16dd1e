"""Joint intent + slot model against the two single-task models, on the same booking data and base encoder.

    python examples/compare_intent_slots.py [--base all-minilm-l6-v2] [--epochs 4] [--lr 1e-4] [--out runs/compare]
    python examples/compare_intent_slots.py --base tiny --epochs 6 --lr 3e-3     # a 2-layer encoder from scratch

Trains `finetune --task classify` (intent), `--task tag` (slots) and `--task intent-slots` (both, one model)
on examples/data/booking_train.jsonl and scores all three on examples/data/booking_test.jsonl (a quarter of
it phrased in ways training never shows): intent accuracy and seqeval-style (exact span) slot F1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llmkit.train.tasks import FinetuneConfig, finetune  # noqa: E402
from llmkit.train.multitask import finetune_intent_slots  # noqa: E402

DATA = REPO / "examples" / "data"


def tiny_base(out: Path) -> str:
    """A randomly initialised 2-layer, 64-wide encoder with a BPE tokenizer trained on the booking texts."""
    from llmkit.io.encoders import save_encoder
    from llmkit.model.encoder import Encoder, EncoderConfig
    from llmkit.tokenizer import Tokenizer

    texts = [json.loads(line)["text"] for line in (DATA / "booking_train.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=400)
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=tokenizer.vocab_size, max_position=64, n_layer=2, n_head=2, n_embd=64,
                                  dropout=0.0, pad_token_id=tokenizer.pad_id))
    save_encoder(out, model, tokenizer)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="all-minilm-l6-v2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    out = Path(args.out)
    base = tiny_base(out / "base") if args.base == "tiny" else args.base
    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=16)
    train, test = DATA / "booking_train.jsonl", DATA / "booking_test.jsonl"
    quiet = lambda _: None  # noqa: E731
    rows = []
    t = time.perf_counter()
    m = finetune(base, train, out / "intent", "classify", val_path=test, config=cfg, log=quiet)
    rows.append(("intent only (classify)", m["accuracy"], None, time.perf_counter() - t))
    t = time.perf_counter()
    m = finetune(base, train, out / "slots", "tag", val_path=test, config=cfg, log=quiet)
    rows.append(("slots only (tag)", None, m["entity_f1"], time.perf_counter() - t))
    t = time.perf_counter()
    m = finetune_intent_slots(base, train, out / "joint", val_path=test, config=cfg, log=quiet)
    rows.append(("joint (intent-slots)", m["intent_accuracy"], m["slot_f1"], time.perf_counter() - t))
    print(f"base {args.base}, {args.epochs} epochs, lr {args.lr}; test: {test.name}")
    print(f"{'model':26}{'intent acc':>12}{'slot F1':>10}{'train s':>10}")
    for name, acc, f1, secs in rows:
        print(f"{name:26}{'-' if acc is None else f'{acc:.4f}':>12}{'-' if f1 is None else f'{f1:.4f}':>10}{secs:>10.1f}")


if __name__ == "__main__":
    main()
