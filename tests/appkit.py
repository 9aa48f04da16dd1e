"""Shared helpers for the application tests: one small joint intent-slots model, trained once per process."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

from conftest import tiny_encoder_dir
from llmkit.train.tasks import FinetuneConfig
from llmkit.train.multitask import finetune_intent_slots

ROOT = Path(__file__).resolve().parents[1]
BOOKING_TRAIN = ROOT / "examples" / "data" / "booking_train.jsonl"
BOOKING_TEST = ROOT / "examples" / "data" / "booking_test.jsonl"
BOOKING_DOMAIN = ROOT / "examples" / "booking_domain.yaml"
JOINT_EPOCHS = 6


def booking_texts() -> list[str]:
    return [json.loads(line)["text"] for line in BOOKING_TRAIN.read_text().splitlines()]


@functools.lru_cache(maxsize=None)
def joint_model() -> tuple[Path, dict]:
    """(dir, test-set metrics) of a 2-layer encoder from scratch with intent and slot heads, trained jointly
    on the example booking data (a few seconds on one core)."""
    root = Path(tempfile.mkdtemp(prefix="llmkit-joint-"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tiny_encoder_dir(root / "base", booking_texts())
        metrics = finetune_intent_slots(str(base), BOOKING_TRAIN, root / "joint", val_path=BOOKING_TEST,
                                        config=FinetuneConfig(epochs=JOINT_EPOCHS, lr=3e-3, batch_size=16),
                                        log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return root / "joint", metrics
