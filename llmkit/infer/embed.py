"""Sentence embeddings from an encoder: `embed_texts`, and the files `llmkit embed` reads and writes."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from llmkit.io.encoders import length_sorted_batches, pad_batch, tokenize
from llmkit.errors import LlmkitError
from llmkit.model.encoder import Encoder
from llmkit.tokenizer import Tokenizer
from llmkit.utils import atomic_open, atomic_path, progress

OUTPUT_FORMATS = (".jsonl", ".npy")


@contextlib.contextmanager
def single_thread():
    """Run a one-question embedding on one intra-op thread. Its matrices are ~10 rows: a second thread saves
    ~3 ms on an idle machine, but when another process holds a core the pool spin-waits for it
    (benchmarks/retrieval_speed.py, MiniLM, 2 cores at load 8: 1.3 s instead of 0.12 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inference_encoder(model: str, device: str = "cpu") -> tuple[Encoder, Tokenizer]:
    """(encoder, tokenizer) as `embed`, `index`, `ask` and the server run it: with the CPU inference routes."""
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.encoders import load_encoder

    net, tokenizer = load_encoder(model, device=device)
    return optimize_for_inference(net), tokenizer


@torch.inference_mode()
def embed_texts(model: Encoder, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """(N, n_embd) float32 sentence embeddings, in the order of `texts`.

    Texts are stripped (as sentence-transformers does), tokenized in one parallel call, and run in
    batches of similar token length, so padding (wasted matmul rows) stays near zero.
    """
    if batch_size < 1:
        raise LlmkitError(f"batch size must be positive, got {batch_size}")
    if not texts:
        return np.zeros((0, model.config.n_embd), dtype=np.float32)
    blank = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if blank is not None:  # nothing to pool over: the mean of no vectors is NaN
        raise LlmkitError(f"text {blank} is empty or only whitespace; there is nothing to embed")
    encodings = tokenize(tokenizer, [t.strip() for t in texts])
    device = next(model.parameters()).device
    out = torch.empty((len(texts), model.config.n_embd), dtype=torch.float32)
    batches = length_sorted_batches([len(e.ids) for e in encodings], batch_size)
    for idx in progress(batches, desc="embed", unit="batch"):
        ids, mask = pad_batch([encodings[i].ids for i in idx], model.config.pad_token_id)
        emb = model.embed_sentences(ids.to(device), mask.to(device))
        out[torch.as_tensor(idx)] = emb.float().cpu()
    if not bool(torch.isfinite(out).all()):
        raise LlmkitError("the encoder produced NaN or infinite embeddings; its weights may be corrupt")
    return out.numpy()


def write_embeddings(path, vectors: np.ndarray, texts: list[str]) -> Path:
    """.npy: the (N, D) float32 matrix. .jsonl: {"text", "embedding"} per line. Written atomically."""
    path = Path(path)
    if path.suffix not in OUTPUT_FORMATS:
        raise LlmkitError(f"output {path} must end in {' or '.join(OUTPUT_FORMATS)}")
    if path.suffix == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors.astype(np.float32))
    else:
        with atomic_open(path, encoding="utf-8") as f:
            f.writelines(jsonl_lines(texts, vectors))
    return path


def jsonl_lines(texts: list[str], vectors: np.ndarray):
    """{"text", "embedding"} lines; 7 decimals keep float32 precision for unit-length vectors."""
    for text, vec in zip(texts, vectors):
        yield json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vec]}, ensure_ascii=False) + "\n"
