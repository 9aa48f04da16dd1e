"""Natural-language understanding behind one call: text -> {"intent", "score", "tags", "slots"}.

`NLU` wraps a joint intent-slots model (`llmkit finetune --task intent-slots`), or a classify model
and/or a tag model trained separately; the dialogue system and the serve endpoints use it.
Words are split on whitespace, and punctuation is split off, as the training data does.
"""
from __future__ import annotations

import re
import threading

from llmkit.io.encoders import load_encoder
from llmkit.errors import LlmkitError
from llmkit.model.heads import MultiTaskEncoder
from llmkit.train.tasks import Example, predict
from llmkit.train.multitask import INTENT, SLOTS, predict_joint, slot_values

WORD = re.compile(r"[\w:'-]+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation split off ('7:45' and "don't" stay whole)."""
    return WORD.findall(text.lower())


class NLU:
    """Thread-safe: one forward pass at a time (HTTP requests arrive on a thread pool)."""

    def __init__(self, joint=None, classifier=None, tagger=None):
        """Each argument is a (model, tokenizer) pair; a joint model, or a classifier and/or a tagger."""
        if joint is None and classifier is None and tagger is None:
            raise LlmkitError("NLU needs a joint intent-slots model, or a classify and/or a tag model")
        self.joint, self.classifier, self.tagger = joint, classifier, tagger
        self._lock = threading.Lock()

    @classmethod
    def load(cls, *paths: str, device: str = "cpu") -> "NLU":
        """From model dirs: one joint model, or a classify model and a tag model (either order)."""
        parts: dict[str, tuple] = {}
        for path in paths:
            model, tokenizer = load_encoder(path, device)
            role = "joint" if isinstance(model, MultiTaskEncoder) else {"classify": "classifier",
                                                                         "tag": "tagger"}.get(model.task)
            if role is None or role in parts:
                raise LlmkitError(f"{path}: not usable as NLU here (task {model.task!r}); give one intent-slots "
                                  "model, or one classify and one tag model")
            parts[role] = (model, tokenizer)
        if "joint" in parts and len(parts) > 1:
            raise LlmkitError("give either a joint intent-slots model or separate classify/tag models, not both")
        return cls(**parts)

    @property
    def intents(self) -> list[str]:
        if self.joint:
            return list(self.joint[0].head_specs[INTENT]["labels"])
        return list(self.classifier[0].labels) if self.classifier else []

    @property
    def slot_types(self) -> list[str]:
        tags = self.joint[0].head_specs[SLOTS]["labels"] if self.joint else (self.tagger[0].labels if self.tagger
                                                                               else [])
        return sorted({t.split("-", 1)[1] for t in tags if t.startswith(("B-", "I-"))})

    def parse(self, texts: list[str]) -> list[dict]:
        """{"text", "intent", "score", "tags", "slots"} per text; intent None without a classifier."""
        examples = []
        for i, text in enumerate(texts):
            tokens = words(text)
            if not tokens:
                raise LlmkitError(f"input {i} has no words")
            examples.append(Example(tokens, None, f"input {i}"))
        with self._lock:
            if self.joint:
                out = predict_joint(*self.joint, examples, warn=False)
            else:
                out = [{"intent": None, "score": None, "tags": ["O"] * len(e.inputs)} for e in examples]
                if self.classifier:
                    plain = [Example(" ".join(e.inputs), None, e.where) for e in examples]
                    for o, p in zip(out, predict(*self.classifier, plain, warn=False)):
                        o.update(intent=p["label"], score=p["score"])
                if self.tagger:
                    for o, p in zip(out, predict(*self.tagger, examples, warn=False)):
                        o["tags"] = p["tags"]
                for o, e in zip(out, examples):
                    o["slots"] = slot_values(e.inputs, o["tags"])
        return [{"text": t, "words": e.inputs, **o} for t, e, o in zip(texts, examples, out)]
