"""Retrieval speed: `llmkit index` against `llmkit embed`, and `llmkit ask`'s retrieval against faiss.

    .venv/bin/python benchmarks/retrieval_speed.py [--chunks 128] [--threads N]

1. Indexing: the same pydoc_data.topics chunks (80 words) embedded by `embed_texts` (what `llmkit embed`
   runs) and by `build_index` (chunking + the same embedding call + writing the index), all-MiniLM-L6-v2,
   alternating, best of two; chunks/s for each.
2. Retrieval: unit vectors (384 dims) in a flat index of 10k and 100k chunks; per-question latency of the
   top-5 search by a NumPy inner product + partial sort (llmkit without faiss-cpu) and by faiss IndexFlatIP
   (what llmkit's Index uses when faiss-cpu is installed), one question at a time as `ask` does.
3. `ask` retrieval end to end on the 10k index: embedding the question with MiniLM + the search, median of 20.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import cpu_isas, cpu_name  # noqa: E402




def timed(fn, repeats: int = 20) -> tuple[float, float]:
    """Median (wall-clock seconds, CPU seconds of this process) of `repeats` calls. On a machine other
    work is loading, wall time includes waiting for a core; CPU time is the work itself."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def indexing(n_chunks: int) -> None:
    from pydoc_data.topics import topics

    from llmkit.apps.retrieval import build_index, chunk_words
    from llmkit.infer.embed import embed_texts
    from llmkit.io.encoders import load_encoder

    model, tokenizer = load_encoder("all-minilm-l6-v2")
    docs, count = [], 0
    for key in sorted(topics):
        pieces = chunk_words(topics[key], 80, 15)
        docs.append((key, topics[key]))
        count += len(pieces)
        if count >= n_chunks:
            break
    texts = [c for _, body in docs for c in chunk_words(body, 80, 15)]
    embed_texts(model, tokenizer, texts[:32])  # warm-up
    rates = {"embed (embed_texts)": [], "index (build_index)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            t = time.perf_counter()
            embed_texts(model, tokenizer, texts)
            rates["embed (embed_texts)"].append(len(texts) / (time.perf_counter() - t))
            t = time.perf_counter()
            build_index(docs, model, tokenizer, tmp, "all-minilm-l6-v2")
            rates["index (build_index)"].append(len(texts) / (time.perf_counter() - t))
    print(f"\n1. indexing {len(texts)} chunks of 80 words, all-MiniLM-L6-v2 (best of 2)")
    print(f"{'':24}{'chunks/s':>10}")
    for name, r in rates.items():
        print(f"{name:24}{max(r):>10.1f}")


def search(sizes=(10_000, 100_000), dim: int = 384, k: int = 5) -> np.ndarray:
    from llmkit.apps.retrieval import Index

    rng = np.random.default_rng(0)
    print(f"\n2. top-{k} search, one question at a time, ms per question (median of 50): wall / CPU")
    print(f"{'chunks':>8}{'numpy matrix':>18}{'faiss FlatIP':>18}")
    for n in sizes:
        vectors = rng.standard_normal((n, dim), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        index = Index.__new__(Index)  # an in-memory index: the search path `ask` runs, without faiss
        index.vectors, index.chunks = vectors, [{"doc": str(i), "chunk": 0, "text": ""} for i in range(n)]
        index.flat = None
        queries = rng.standard_normal((50, dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        it = iter(range(10**9))
        ours = "{:.2f} / {:.2f}".format(*(x * 1e3 for x in timed(lambda: index.search(queries[next(it) % 50][None], k), 50)))
        theirs = "n/a"
        try:
            import faiss

            flat = faiss.IndexFlatIP(dim)
            flat.add(vectors)
            it2 = iter(range(10**9))
            theirs = "{:.2f} / {:.2f}".format(*(x * 1e3 for x in timed(lambda: flat.search(queries[next(it2) % 50][None], k), 50)))
            got = [h.doc for h in index.search(queries[:1], k)[0]]
            assert got == [str(i) for i in flat.search(queries[:1], k)[1][0]], "faiss and llmkit disagree"
        except ImportError:
            pass
        print(f"{n:>8}{ours:>18}{theirs:>18}")
        if n == sizes[0]:
            from llmkit.apps.retrieval import flat_index

            small, index.flat = index, flat_index(vectors)  # `ask` as shipped: faiss when installed
    return small


def ask_latency(index) -> None:
    from llmkit.infer.embed import embed_texts
    from llmkit.io.encoders import load_encoder

    model, tokenizer = load_encoder("all-minilm-l6-v2")
    questions = ["How do I stop a loop early?", "What does the with statement do?", "How are integers written?",
                 "How do I catch an exception?", "What is the precedence of operators?"]
    embed_texts(model, tokenizer, questions)  # warm-up
    it = iter(range(10**9))
    wall, cpu = timed(lambda: index.search(embed_texts(model, tokenizer, [questions[next(it) % 5]]), 4), 20)
    print(f"\n3. ask retrieval over {len(index.chunks)} chunks (embed the question + top-4 search): "
          f"{wall * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU, median of 20 (target < 50 ms)")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-index", action="store_true", help="only the search and ask timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    isa = cpu_isas(("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile"))
    print(f"{cpu_name()}; {' '.join(isa) or 'ISA unknown'}; torch threads {torch.get_num_threads()}")
    if not args.skip_index:
        indexing(args.chunks)
    small = search()
    ask_latency(small)


if __name__ == "__main__":
    main()
