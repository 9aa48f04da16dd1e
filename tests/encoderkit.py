"""Shared helpers for the encoder tests: synthetic intent / slot data and tiny encoder directories."""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmkit.cli import main  # noqa: E402
from llmkit.encoders import save_encoder  # noqa: E402
from llmkit.model.encoder import Encoder, EncoderConfig  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

CITIES = ["paris", "london", "tokyo", "berlin", "madrid", "rome", "oslo", "lima", "cairo", "delhi"]
SONGS = ["yellow", "hello", "imagine", "thriller", "vogue", "halo", "believer", "roar"]
TIMES = ["six", "seven", "eight", "nine", "ten", "noon", "midnight"]
FOODS = ["pizza", "sushi", "tacos", "noodles", "curry", "salad"]
# intent -> templates; {city}, {song}, {time}, {food} are slots (tagged B-/I- in the tagging data)
INTENTS = {
    "weather": ["what is the weather in {city}", "will it rain in {city} today", "how cold is it in {city}",
                "tell me the forecast for {city}", "is it sunny in {city}"],
    "flight": ["book a flight to {city}", "i need a plane ticket to {city}", "find flights from {city} to {city}",
               "fly me to {city} tomorrow", "are there cheap flights to {city}"],
    "music": ["play {song}", "put on {song} please", "i want to hear {song}", "start the song {song}",
              "play some {song} for me"],
    "alarm": ["wake me up at {time}", "set an alarm for {time}", "alarm at {time} please",
              "remind me at {time} to get up", "i need to be up by {time}"],
    "food": ["order {food} for dinner", "i am hungry get me {food}", "deliver {food} to my house",
             "can you order some {food}", "i would like {food} tonight"],
}
SLOTS = {"city": CITIES, "song": SONGS, "time": TIMES, "food": FOODS}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread avoids OpenMP spin-waiting when test workers share two cores.
    Test modules import this fixture, which makes it autouse there."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `llmkit ARGS...` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["llmkit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def _fill(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for piece in template.split():
        if piece.startswith("{"):
            kind = piece.strip("{}")
            value = rng.choice(SLOTS[kind]).split()
            words += value
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(value) - 1)
        else:
            words.append(piece)
            tags.append("O")
    return words, tags


def intent_data(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        intent = rng.choice(sorted(INTENTS))
        words, _ = _fill(rng.choice(INTENTS[intent]), rng)
        out.append({"text": " ".join(words), "label": intent})
    return out


def slot_data(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = _fill(rng.choice([t for ts in INTENTS.values() for t in ts]), rng)
        out.append({"tokens": words, "tags": tags})
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_encoder_dir(path: Path, texts: list[str], seed: int = 0, **config) -> Path:
    """A randomly initialised 2-layer encoder with a byte-level BPE tokenizer trained on `texts`."""
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=400)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tokenizer.vocab_size, max_position=64, n_layer=2, n_head=2, n_embd=64,
               dropout=0.0, pad_token_id=tokenizer.pad_id)
    model = Encoder(EncoderConfig(**{**cfg, **config}))
    save_encoder(path, model, tokenizer)
    return path
