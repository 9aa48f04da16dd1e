"""Retrieval-augmented answers: chunk documents, embed them into a flat inner-product index, search, cite.

An index is a directory:
  vectors.npy    (N, D) float32, unit-length chunk embeddings
  chunks.jsonl   {"doc", "chunk", "text"} per row of vectors.npy
  index.json     the embedding model's name and fingerprint, chunking settings, counts (written last)
Search is exact (flat inner product): one NumPy matrix product and a partial sort. faiss's IndexFlatIP
measured slower for `ask`'s one question at a time (benchmarks/retrieval_speed.py, two runs on a 2-core
AMD EPYC, AVX2, top-10, warm, every thread pool pinned alike): with 2 threads NumPy 1.2-1.3 ms at 10k
chunks and 11.5-12.0 ms at 100k, faiss 5.2-5.7 and 20.1-22.2 ms (one query ran on one faiss thread while
the other spun: twice the CPU); with 1 thread faiss 1.5-1.6 / 19.1-21.2 ms, NumPy 2.6-2.8 / 21.0-22.7.
One query is a pass over the whole matrix, bound by memory bandwidth, which BLAS spreads over the cores
and faiss did not. A query must be embedded by the very model that built the index: the fingerprint
(config + a sample of the weights) is checked before any search.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmkit.errors import LlmkitError
from llmkit.utils import atomic_open, atomic_path, read_json

INDEX_FILE, VECTORS_FILE, CHUNKS_FILE = "index.json", "vectors.npy", "chunks.jsonl"
DOC_SUFFIXES = (".txt", ".md", ".jsonl")


# ---- documents and chunks -----------------------------------------------------------------------

def read_documents(paths) -> list[tuple[str, str]]:
    """(doc id, text): .txt/.md files (id = path), .jsonl lines {"id"?, "text"}, or directories of them."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in DOC_SUFFIXES and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise LlmkitError(f"no such file or directory: {p}")
    docs = []
    for f in files:
        if f.suffix != ".jsonl":
            try:
                docs.append((str(f), f.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as e:
                raise LlmkitError(f"cannot read {f}: {e}") from None
            continue
        from llmkit.utils import read_jsonl

        for n, record in read_jsonl(f, "documents"):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LlmkitError(f"{f}:{n}: expected {{\"id\": ..., \"text\": ...}}")
            docs.append((str(record.get("id", f"{f}:{n}")), record["text"]))
    docs = [(i, t) for i, t in docs if t.strip()]
    if not docs:
        raise LlmkitError("no documents with text to index")
    return docs


def chunk_words(text: str, size: int, overlap: int) -> list[str]:
    """Windows of `size` words, each sharing `overlap` words with the previous one."""
    words = text.split()
    step = size - overlap
    return [" ".join(words[i: i + size]) for i in range(0, max(1, len(words) - overlap), step)]


def fingerprint(model) -> str:
    """A short hash of the encoder's config and a sample of its weights: equal models, equal prints."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in list(model.state_dict().items())[:: max(1, len(model.state_dict()) // 8)]:
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().flatten()[:256].numpy().tobytes())
    return h.hexdigest()[:16]


# ---- the index ----------------------------------------------------------------------------------

def build_index(docs: list[tuple[str, str]], model, tokenizer, out_dir, model_name: str, size: int = 80,
                overlap: int = 15, batch_size: int = 32) -> dict:
    """Chunk, embed and save; returns the index.json record."""
    from llmkit.infer.embed import embed_texts

    if size < 1 or not 0 <= overlap < size:
        raise LlmkitError(f"chunks need size >= 1 and 0 <= overlap < size (got {size}, {overlap})")
    chunks = [(doc, i, text) for doc, body in docs for i, text in enumerate(chunk_words(body, size, overlap))]
    vectors = embed_texts(model, tokenizer, [t for _, _, t in chunks], batch_size)
    meta = {"model": model_name, "fingerprint": fingerprint(model), "dim": int(vectors.shape[1]),
            "chunks": len(chunks), "documents": len(docs), "chunk_words": size, "overlap": overlap}
    return write_index(out_dir, vectors, chunks, meta)


def write_index(out_dir, vectors: np.ndarray, chunks: list[tuple[str, int, str]], meta: dict) -> dict:
    """The three files of an index; (doc, chunk number, text) per row of `vectors`."""
    out = Path(out_dir)
    with atomic_path(out / VECTORS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors.astype(np.float32))
    with atomic_open(out / CHUNKS_FILE, encoding="utf-8") as f:
        f.writelines(json.dumps({"doc": d, "chunk": i, "text": t}, ensure_ascii=False) + "\n" for d, i, t in chunks)
    with atomic_open(out / INDEX_FILE, encoding="utf-8") as f:  # last: an index.json means a complete index
        json.dump(meta, f, indent=2)
    return meta


@dataclass
class Hit:
    score: float
    doc: str
    chunk: int
    text: str


class Index:
    def __init__(self, path):
        path = Path(path)
        self.meta = read_json(path / INDEX_FILE, missing=f"{path} is not an index (no {INDEX_FILE}); "
                                                         "build one with `llmkit index`")
        try:
            self.vectors = np.load(path / VECTORS_FILE)
            self.chunks = [json.loads(line) for line in (path / CHUNKS_FILE).read_text(encoding="utf-8").splitlines()]
        except (OSError, ValueError) as e:
            raise LlmkitError(f"index {path} is damaged: {e}") from None
        if self.vectors.shape != (len(self.chunks), self.meta.get("dim")):
            raise LlmkitError(f"index {path} is damaged: {self.vectors.shape[0]} vectors for {len(self.chunks)} chunks")
        self.path = path

    def check_model(self, model, model_name: str) -> None:
        if fingerprint(model) != self.meta.get("fingerprint"):
            raise LlmkitError(f"index {self.path} was built with embedding model {self.meta.get('model')!r}, "
                              f"not {model_name!r}: query it with --model {self.meta.get('model')} "
                              "(or rebuild it with `llmkit index`)")

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k chunks by inner product (= cosine: all vectors are unit length), best first, per query."""
        k = min(k, len(self.chunks))
        scores, top = top_k(self.vectors, np.ascontiguousarray(queries, dtype=np.float32), k)
        return [[Hit(float(s), self.chunks[i]["doc"], self.chunks[i]["chunk"], self.chunks[i]["text"])
                 for s, i in zip(row_scores, row)] for row_scores, row in zip(scores, top)]


def top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row numbers), (Q, k) each, best first: the k rows of `vectors` with the largest inner
    product with each query. One matrix product, then a partial sort (O(N)) and a sort of the k."""
    full = queries @ vectors.T                                                   # (Q, N)
    top = np.argpartition(-full, k - 1, axis=1)[:, :k]                           # unordered top k
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(full, top, 1), axis=1), 1)
    return np.take_along_axis(full, top, 1), top


# ---- asking -------------------------------------------------------------------------------------

def answer_prompt(question: str, hits: list[Hit]) -> str:
    sources = "\n\n".join(f"[{n}] {h.text}" for n, h in enumerate(hits, 1))
    return (f"Answer the question using only the numbered sources below, and cite the sources you used "
            f"like [1].\n\n{sources}\n\nQuestion: {question}")


def recall_at_k(index: Index, model, tokenizer, questions: list[tuple[str, str]], ks=(1, 3, 5)) -> dict:
    """Share of questions whose source document is among the documents of the top-k chunks."""
    from llmkit.infer.embed import embed_texts

    hits = index.search(embed_texts(model, tokenizer, [q for q, _ in questions]), max(ks))
    return {f"recall@{k}": sum(doc in {h.doc for h in hs[:k]} for (_, doc), hs in zip(questions, hits)) / len(hits)
            for k in ks} | {"questions": len(questions)}


def read_questions(path) -> list[tuple[str, str]]:
    from llmkit.utils import read_jsonl

    out = []
    for n, record in read_jsonl(path, "questions"):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "doc")):
            raise LlmkitError(f"{path}:{n}: expected {{\"question\": ..., \"doc\": ...}}")
        out.append((record["question"], record["doc"]))
    return out
