"""Retrieval speed: `llmkit index` against `llmkit embed`, and `llmkit ask`'s retrieval over a 10k-chunk index.

    .venv/bin/python benchmarks/retrieval_speed.py [--chunks 256] [--asks 5] [--threads N]

1. Indexing: the same pydoc_data.topics chunks (80 words) embedded by `embed`'s engine (`embed_texts` on
   `inference_encoder`, what `llmkit embed` runs) and by `build_index` on the same engine (what `llmkit index`
   runs: chunking + that embedding + writing the index), all-MiniLM-L6-v2, rounds alternating; chunks/s
   each (median, best, every round). Then `llmkit embed` on those chunks (one per line) against `llmkit
   index` on their documents, each in a fresh process (model loading included), rounds alternating.
2. Search: unit vectors (384 dims) in a flat index of 10k and 100k chunks; per-question top-10 latency of
   the NumPy inner product + partial sort (llmkit's Index) and of faiss IndexFlatIP (faiss-cpu, a
   benchmark-only dependency here), at 1 and 2 threads with all thread pools pinned alike.
3. `ask` retrieval on a 10k-chunk index (embedding the question + the top-4 search): in this process, warm,
   median of 20; and as users run it, `llmkit ask --retrieve-only` in a fresh process each time (the question
   is that process's first), the time it reports for its retrieval, and its whole run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import cpu_isas, cpu_name  # noqa: E402

MODEL = "all-minilm-l6-v2"
QUESTIONS = ["How do I stop a loop early?", "What does the with statement do?", "How are integers written?",
             "How do I catch an exception?", "What is the precedence of operators?"]


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


def pydoc_docs(n_chunks: int) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    from llmkit.apps.retrieval import chunk_words

    docs, count = [], 0
    for key in sorted(topics):
        docs.append((key, topics[key]))
        count += len(chunk_words(topics[key], 80, 15))
        if count >= n_chunks:
            break
    return docs


def indexing(n_chunks: int, rounds: int = 5) -> None:
    """Chunks per second of `embed`'s embedding and of `index`'s whole build (chunk + embed + write) on the
    same chunks, in this process, rounds alternating; then both commands in fresh processes, as users run
    them (model loading included)."""
    from llmkit.apps.retrieval import build_index, chunk_words
    from llmkit.infer.embed import embed_texts, inference_encoder

    model, tokenizer = inference_encoder(MODEL)
    docs = pydoc_docs(n_chunks)
    texts = [c for _, body in docs for c in chunk_words(body, 80, 15)]
    embed_texts(model, tokenizer, texts[:32])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"embed": lambda: embed_texts(model, tokenizer, texts),
                "index": lambda: build_index(docs, model, tokenizer, tmp, MODEL)}
        measure_rounds(runs, len(texts), 1)  # a first pass of each, not counted: allocations, page faults
        rates = measure_rounds(runs, len(texts), rounds)
        print(f"\n1. {len(texts)} chunks of 80 words, {MODEL}, {rounds} alternating rounds: chunks per wall "
              "second (per CPU second)")
        show_rates(rates, "in process: embed_texts (embed) / build_index (index)")
        cli = [sys.executable, "-m", "llmkit.cli"]
        Path(tmp, "chunks.txt").write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        Path(tmp, "docs.jsonl").write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in docs))
        commands = {"embed": cli + ["embed", f"{tmp}/chunks.txt", "--out", f"{tmp}/chunks.npy"],
                    "index": cli + ["index", f"{tmp}/docs.jsonl", "--out", f"{tmp}/index"]}
        rates = measure_rounds({name: lambda c=c: run_command(c) for name, c in commands.items()}, len(texts),
                               max(2, rounds // 2), children=True)
        show_rates(rates, "commands, fresh processes (model load included)")


def measure_rounds(runs: dict, n: int, rounds: int, children: bool = False) -> dict[str, list[tuple[float, float]]]:
    """(items per wall second, per CPU second) of each run, per round; the runs alternate within a round."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t, c = time.perf_counter(), cpu_seconds(children)
            run()
            rates[name].append((n / (time.perf_counter() - t), n / (cpu_seconds(children) - c)))
    return rates


def cpu_seconds(children: bool) -> float:
    if not children:
        return time.process_time()
    usage = os.times()
    return usage.children_user + usage.children_system


def run_command(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "LLMKIT_PROGRESS": "0"})
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[2:4])} failed: {done.stderr.strip()[-500:]}")


def show_rates(rates: dict, title: str) -> None:
    (embed, index) = rates.values()
    median = {name: statistics.median(w for w, _ in r) for name, r in rates.items()}
    cpu = {name: statistics.median(c for _, c in r) for name, r in rates.items()}
    print(f"  {title}")
    for name, r in rates.items():
        print(f"    {name:<6} median {median[name]:6.1f} ({cpu[name]:5.1f})   best {max(w for w, _ in r):6.1f}   "
              f"rounds {' '.join(f'{w:.1f}' for w, _ in r)}")
    print(f"    index / embed: {median['index'] / median['embed']:.3f} wall, {cpu['index'] / cpu['embed']:.3f} CPU; "
          f"per round {' '.join(f'{i[0] / e[0]:.2f}' for e, i in zip(embed, index))}")


def search(sizes=(10_000, 100_000), dim: int = 384, k: int = 10, thread_counts=(1, 2), rounds: int = 5) -> None:
    """NumPy's matrix product + partial sort against faiss's IndexFlatIP, one question at a time, with
    every thread pool pinned to the same count: torch's OpenMP, faiss's own OpenMP (a second libgomp) and
    both OpenBLAS copies (threadpoolctl). Warm: 5 questions before timing; rounds alternate the two."""
    from threadpoolctl import threadpool_limits

    from llmkit.apps.retrieval import top_k

    try:
        import faiss  # faiss-cpu: this benchmark's own dependency (`pip install faiss-cpu`), not llmkit's
    except ImportError:
        faiss = None
    before = torch.get_num_threads()
    rng = np.random.default_rng(0)
    print(f"\n2. top-{k} search of {dim}-dim unit vectors, one question at a time: ms per question, median of "
          f"{rounds} rounds x 20 questions, wall / CPU")
    print(f"{'threads':>8}{'chunks':>9}{'numpy matrix':>18}{'faiss FlatIP':>18}")
    for n in sizes:
        vectors = unit_vectors(rng, n, dim)
        flat = None
        if faiss is not None:
            flat = faiss.IndexFlatIP(dim)
            flat.add(vectors)
        queries = unit_vectors(rng, 20, dim)
        runs = {"numpy": lambda q: top_k(vectors, q, k)}
        if flat is not None:
            runs["faiss"] = lambda q: flat.search(q, k)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            if faiss is not None:
                faiss.omp_set_num_threads(threads)
            times = {name: [] for name in ("numpy", "faiss")}
            with threadpool_limits(threads):
                for r in range(rounds + 1):  # round 0 warms both up and is not counted
                    for name, run in runs.items():
                        wall, cpu = timed(lambda qs=iter(queries): run(next(qs)[None]), 20)
                        if r:
                            times[name].append((wall, cpu))
            shown = [f"{statistics.median(w for w, _ in t) * 1e3:.2f} / {statistics.median(c for _, c in t) * 1e3:.2f}"
                     if t else "n/a" for t in times.values()]
            print(f"{threads:>8}{n:>9}{shown[0]:>18}{shown[1]:>18}")
    torch.set_num_threads(before)


def unit_vectors(rng, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def ten_k_index(path: Path, model, n: int = 10_000) -> Path:
    """An index of `n` chunks for `model`: its fingerprint, random unit vectors (search time does not depend
    on what they hold), placeholder texts."""
    from llmkit.apps.retrieval import fingerprint, write_index

    chunks = [(f"doc{i // 10}", i % 10, f"chunk {i} of the benchmark index") for i in range(n)]
    write_index(path, unit_vectors(np.random.default_rng(1), n, model.config.n_embd), chunks,
                {"model": MODEL, "fingerprint": fingerprint(model), "dim": model.config.n_embd, "chunks": n,
                 "documents": n // 10, "chunk_words": 80, "overlap": 15})
    return path


def ask_latency(asks: int) -> None:
    from llmkit.apps.retrieval import Index
    from llmkit.infer.embed import embed_texts, inference_encoder, single_thread

    model, tokenizer = inference_encoder(MODEL)
    with tempfile.TemporaryDirectory() as tmp, single_thread():  # as `ask` embeds its question
        index = Index(ten_k_index(Path(tmp) / "index", model))
        embed_texts(model, tokenizer, QUESTIONS)  # warm-up
        it = iter(range(10**9))
        wall, cpu = timed(lambda: index.search(embed_texts(model, tokenizer, [QUESTIONS[next(it) % 5]]), 4), 20)
        print(f"\n3. ask retrieval over {len(index.chunks):,} chunks (embed the question + top-4 search), ms")
        print(f"{'in process, warm (median of 20)':<46}{wall * 1e3:>8.1f} wall {cpu * 1e3:>8.1f} CPU")
        reported, whole = [], []
        for i in range(asks):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "llmkit.cli", "ask", QUESTIONS[i % 5], "--index",
                                   str(Path(tmp) / "index"), "--retrieve-only"], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
            whole.append(time.perf_counter() - t)
            found = re.search(r"retrieved \d+ of [\d,]+ chunks in ([\d.]+) ms", done.stderr)
            if done.returncode != 0 or found is None:
                sys.exit(f"llmkit ask failed: {done.stderr.strip()[-500:]}")
            reported.append(float(found.group(1)))
        print(f"{f'llmkit ask --retrieve-only, fresh process x{asks}':<46}{statistics.median(reported):>8.1f} wall "
              f"(median; {min(reported):.1f}-{max(reported):.1f}), whole command {statistics.median(whole):.1f} s")
        print("target: under 50 ms wall")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=256)
    parser.add_argument("--asks", type=int, default=5, help="fresh `llmkit ask` processes to time")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-index", action="store_true", help="only the search and ask timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    isa = cpu_isas(("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile"))
    print(f"{cpu_name()}; {' '.join(isa) or 'ISA unknown'}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_index:
        indexing(args.chunks)
    search()
    ask_latency(args.asks)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
