"""/v1/embeddings: llmkit's encoders (llmkit.io.encoders, llmkit.infer.embed) behind a thread-safe callable."""
from __future__ import annotations

import threading

import numpy as np

from llmkit.infer.embed import embed_texts, inference_encoder
from llmkit.io.encoders import is_encoder, tokenize

__all__ = ["Embedder", "is_encoder", "load_embedder"]


class Embedder:
    """texts -> (float32 array (N, D) of sentence embeddings, number of tokens read)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._lock = threading.Lock()  # requests arrive on a thread pool; one forward at a time

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, int]:
        with self._lock:
            vectors = embed_texts(self.model, self.tokenizer, texts)
        # usage counts what the model read: the stripped, truncated text with its [CLS]/[SEP]
        n_tokens = sum(len(e.ids) for e in tokenize(self.tokenizer, [t.strip() for t in texts], warn=False))
        return vectors, n_tokens


def load_embedder(name_or_path: str) -> Embedder:
    return Embedder(*inference_encoder(name_or_path))
