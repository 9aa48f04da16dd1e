"""Writes sentence-pair data (examples/data/pairs_{train,test}.jsonl) from the booking NLU data, deterministically.

The task is duplicate-request detection, as Quora Question Pairs is for questions: do two customer messages
ask for the same thing (the same intent)? Each line is
  {"text": "book me a table at 7pm", "text_pair": "reservation for 4 at 8pm saturday", "label": "same"}
Every utterance of the booking file is the first text of two pairs, one "same" and one "different", so
neither text alone says anything about the label: only comparing the two does. The test pairs come from
booking_test.jsonl, a quarter of which is phrased in ways the training file never shows.

    python examples/make_pair_data.py            # rewrites both files
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).parent / "data"


def make_pairs(utterances: list[tuple[str, str]], seed: int) -> list[dict]:
    """(text, intent) list -> two pairs per utterance: one with another text of its intent, one without."""
    rng = random.Random(seed)
    by_intent: dict[str, list[str]] = {}
    for text, intent in utterances:
        by_intent.setdefault(intent, []).append(text)
    pairs = []
    for text, intent in utterances:
        same = [t for t in by_intent[intent] if t != text] or by_intent[intent]
        other = rng.choice(sorted(set(by_intent) - {intent}))
        pairs.append({"text": text, "text_pair": rng.choice(same), "label": "same"})
        pairs.append({"text": text, "text_pair": rng.choice(by_intent[other]), "label": "different"})
    return pairs


def read(name: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines()]
    return [(r["text"], r["label"]) for r in rows]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    write(DATA / "pairs_train.jsonl", make_pairs(read("booking_train.jsonl"), seed=1))
    write(DATA / "pairs_test.jsonl", make_pairs(read("booking_test.jsonl"), seed=2))
    print(f"wrote {DATA / 'pairs_train.jsonl'} and {DATA / 'pairs_test.jsonl'}")
