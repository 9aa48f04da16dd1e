"""Writes the restaurant-booking NLU data (examples/data/booking_{train,test}.jsonl), deterministically.

Each line carries both labels, so one file trains the joint model and the two single-task baselines:
  {"text": "table for 4 at 7pm", "tokens": [...], "tags": ["O", "O", "B-people", "O", "B-time"], "label": "book_table"}
The last template of every intent appears only in the test file: the test set measures some
generalisation to unseen phrasings, not only to unseen slot-value combinations.

    python examples/make_booking_data.py            # rewrites both files
"""
from __future__ import annotations

import json
import random
from pathlib import Path

VALUES = {
    "people": ["2", "3", "4", "5", "6", "8", "10", "two", "three", "four", "five", "six", "eight", "twelve"],
    "day": ["today", "tomorrow", "tonight", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
            "sunday", "next friday", "this saturday", "the weekend"],
    "time": ["7pm", "8pm", "6:30", "7:45", "noon", "8 pm", "19:00", "half past seven", "nine", "six thirty",
             "lunchtime", "9pm"],
    "name": ["alice", "bob", "chen", "maria", "dupont", "okafor", "sato", "garcia", "ivanova", "smith"],
}
TEMPLATES = {
    "book_table": [
        "book a table for {people} on {day} at {time}", "i want to reserve a table for {people} people",
        "can i get a table {day} at {time}", "reservation for {people} at {time} {day}", "table for {people} please",
        "i would like to book a table", "we are {people} and want to eat {day}", "book me a table at {time}",
        "reserve a table {day} for {people} under {name}", "do you have a table for {people} at {time}",
        "i need a dinner reservation", "get us a table for {people} {day} around {time}",
        "could you book {day} at {time} for {people} people",
    ],
    "inform": [
        "{people} people", "for {people}", "at {time}", "{day}", "make it {time}", "actually {people} people",
        "change it to {day}", "no make that {time}", "on {day}", "the name is {name}", "under {name}",
        "{day} at {time}", "we will be {people}", "put it under the name {name}",
    ],
    "affirm": ["yes", "yes please", "correct", "that is right", "sounds good", "sure", "yep do it", "perfect",
               "yes that works", "exactly"],
    "deny": ["no", "no that is wrong", "not quite", "nope", "that is not right", "no wait", "wrong"],
    "cancel": ["cancel", "forget it", "cancel the booking", "never mind stop", "i do not want it anymore",
               "stop please cancel", "drop the reservation"],
    "greet": ["hi", "hello", "good evening", "hey there", "hello there", "good morning", "hey"],
}


def fill(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    """Words and BIO tags: each {slot} becomes a random value of it, B- on its first word, I- on the rest."""
    pairs = []
    for piece in template.split():
        kind = piece.strip("{}") if piece.startswith("{") else None
        words = rng.choice(VALUES[kind]).split() if kind else [piece]
        pairs += [(w, "O" if kind is None else f"{'I' if j else 'B'}-{kind}") for j, w in enumerate(words)]
    return [w for w, _ in pairs], [t for _, t in pairs]


def make(n: int, seed: int, test: bool) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        intent = rng.choice(sorted(TEMPLATES))
        pool = TEMPLATES[intent] if test else TEMPLATES[intent][:-1]  # the last template is test-only
        if test and rng.random() < 0.25:
            pool = pool[-1:]
        words, tags = fill(rng.choice(pool), rng)
        records.append({"text": " ".join(words), "tokens": words, "tags": tags, "label": intent})
    return records


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":
    out = Path(__file__).parent / "data"
    write(out / "booking_train.jsonl", make(600, seed=1, test=False))
    write(out / "booking_test.jsonl", make(200, seed=2, test=True))
    print(f"wrote {out / 'booking_train.jsonl'} and {out / 'booking_test.jsonl'}")
