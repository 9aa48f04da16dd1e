"""Decode speed of pruned models beside their original: batch 1, greedy, KV cache, as `llmkit generate` runs.

    .venv/bin/python benchmarks/prune_speed.py ORIGINAL PRUNED [MORE...] [--new-tokens 64] [--repeats 3]
                                               [--threads 1] [--json]

Every model decodes the same prompt in the same process, rounds interleaved (A B A B ...), so a
machine shared with other jobs slows them alike. Per model: parameters, decode tokens/s over wall
time and over this process's CPU time (with --threads 1 the CPU-time figure is what an idle core
gives), each the best of --repeats, and the ratio to the first model. Unstructured zeros do not
change these numbers (dense kernels multiply zeros too); only structured pruning does.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine import cpu_name  # noqa: E402

PROMPT = "Explain in a few sentences why the sky is blue."




def decode_once(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(wall s, CPU s) of new_tokens greedy steps after a prefill of `ids` (the prefill is not timed)."""
    cache = model.new_cache(1, len(ids) + new_tokens + 1)
    logits = model(torch.tensor([ids]), cache=cache, last_only=True)[0][:, -1]
    tok = logits.argmax(-1, keepdim=True)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        tok = model(tok, cache=cache, last_only=True)[0][:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(model_dirs: list[str], new_tokens: int = 64, repeats: int = 3) -> list[dict]:
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.resolve import resolve_model

    models = []
    for name in model_dirs:
        model, tok = resolve_model(name, dtype="float32")  # pruned models are float: compare like with like
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
        models.append((name, optimize_for_inference(model.eval(), single_row=True), ids))  # as `llmkit generate`
    best = {name: [float("inf"), float("inf")] for name, _, _ in models}
    with torch.inference_mode():
        for name, model, ids in models:  # warm-up: kernels built, caches touched
            decode_once(model, ids, 4)
        for _ in range(repeats):
            for name, model, ids in models:
                wall, cpu = decode_once(model, ids, new_tokens)
                best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
    rows = []
    for name, model, _ in models:
        wall, cpu = best[name]
        rows.append({"model": name, "params": sum(p.numel() for p in set(model.parameters())),
                     "layers": model.config.n_layer, "tok_s": new_tokens / wall, "cpu_tok_s": new_tokens / cpu})
    for row in rows:
        row["ratio"] = row["tok_s"] / rows[0]["tok_s"]
        row["cpu_ratio"] = row["cpu_tok_s"] / rows[0]["cpu_tok_s"]
    return rows


def instruction_sets() -> str:
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile")
    return " ".join(f.upper() for f in wanted if f in flags)


def table(rows: list[dict], threads: int) -> str:
    from llmkit.infer import kernels

    lines = [f"{cpu_name()} ({instruction_sets()}), llmkit kernels {'on' if kernels.available() else 'off'}, "
             f"{threads} thread(s), batch 1, greedy",
             f"{'model':<40} {'params':>12} {'layers':>6} {'tok/s':>8} {'CPU-time tok/s':>15} {'ratio':>6} "
             f"{'CPU ratio':>9}"]
    for r in rows:
        lines.append(f"{r['model'][-40:]:<40} {r['params']:>12,} {r['layers']:>6} {r['tok_s']:>8.1f} "
                     f"{r['cpu_tok_s']:>15.1f} {r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="original first, then pruned models (dirs, .gguf, short names)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.models, args.new_tokens, args.repeats)
    print(json.dumps(rows) if args.json else table(rows, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
