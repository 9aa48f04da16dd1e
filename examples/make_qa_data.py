"""Writes small SQuAD-style QA files (examples/data/qa_{train,dev}.jsonl) about restaurants, deterministically.

Each context describes one restaurant (four facts, shuffled) among other sentences, in 40-70 words:
long enough that a small encoder window (48 tokens) needs overlapping windows.

    python examples/make_qa_data.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Luigi's", "Blue Lotus", "Casa Verde", "The Anchor", "Sakura", "Le Petit Four", "Spice Route",
         "Golden Wok", "Olive Tree", "Nordic Table", "Taco Loco", "Red Lantern"]
FACTS = {  # slot -> (sentence template, question template, values)
    "cuisine": ("{name} serves {value} food.", "What food does {name} serve?",
                ["italian", "thai", "mexican", "japanese", "french", "indian", "greek", "korean"]),
    "street": ("{name} is on {value}.", "Where is {name}?",
               ["Elm Street", "King Road", "Harbour Lane", "Mill Avenue", "Park Row", "Station Square"]),
    "opens": ("{name} opens at {value} every day.", "When does {name} open?",
              ["noon", "5pm", "6:30pm", "11am", "7pm", "8am"]),
    "chef": ("The chef at {name} is {value}.", "Who is the chef at {name}?",
             ["Anna Rossi", "Kenji Sato", "Marie Dubois", "Ravi Patel", "Elena Garcia", "Tom Berg"]),
}

FILLER = ["Reservations are recommended on weekends.", "The dining room seats about forty guests.",
          "Parking is available around the corner.", "Many guests come back for the desserts.",
          "The menu changes with the seasons.", "Prices are moderate for the area."]


def make(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for k in range(n):
        name = rng.choice(NAMES)
        facts = [(slot, rng.choice(FACTS[slot][2])) for slot in sorted(FACTS)] + [(None, s) for s in rng.sample(FILLER, 2)]
        rng.shuffle(facts)
        context, spans = "", []
        for slot, value in facts:
            if slot is None:
                context += value + " "
                continue
            sentence = FACTS[slot][0].format(name=name, value=value)
            spans.append((name, slot, value, len(context) + sentence.index(value)))
            context += sentence + " "
        name, slot, value, start = rng.choice(spans)
        records.append({"id": f"q{seed}-{k}", "context": context.strip(),
                        "question": FACTS[slot][1].format(name=name),
                        "answers": [{"text": value, "answer_start": start}]})
    return records


if __name__ == "__main__":
    out = Path(__file__).parent / "data"
    for name, n, seed in (("qa_train.jsonl", 400, 1), ("qa_dev.jsonl", 100, 2)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in make(n, seed)), encoding="utf-8")
    print(f"wrote {out / 'qa_train.jsonl'} and {out / 'qa_dev.jsonl'}")
