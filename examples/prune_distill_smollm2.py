"""A smaller, faster SmolLM2: structured pruning to about two thirds of the parameters, then recovery by
distilling from the original, on the CPU. Also unstructured 50% sparsity, magnitude against Wanda.

    python examples/prune_distill_smollm2.py [--out runs/prune_smollm2] [--params 90M] [--layers 24]
                                             [--steps 60] [--threads 2]

1. SmolLM2-135M-Instruct (the embedded GGUF) is converted to an llmkit directory: the original;
2. Python's bundled documentation (pydoc_data.topics) is tokenized with its tokenizer; a tenth of the
   documents is held out; calibration text is the start of the training split;
3. `llmkit prune --params 90M --layers 24`: the 6 layers whose removal costs least loss go, then the MLP
   is narrowed (least-contributing channels first) until the model fits 90M parameters;
4. `llmkit distill`: the pruned model learns the original's next-token distributions on the training split;
5. perplexity on held-out text (the held-out documents, and the end of tinyshakespeare, which no step
   trains on) before pruning, right after, after recovery; greedy answers to a few questions; decode
   speed side by side (benchmarks/prune_speed.py); unstructured 50% magnitude vs Wanda perplexity.
Steps whose output exists are not redone, so an interrupted run continues; --stages runs some of them
(e.g. the unstructured ones in a second process beside the long recovery). Results go to OUT/results/
and, once all are there, a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "What does a Python for loop do? Answer in one sentence."]


def prepare_corpus(out: Path, tokenizer_file: Path) -> Path:
    from llmkit.data.corpus import prepare
    from llmkit.demo import write_corpus
    from llmkit.tokenizer import Tokenizer

    data = out / "data"
    if not (data / "meta.json").exists():
        write_corpus(out / "corpus.jsonl")
        prepare([out / "corpus.jsonl"], data, Tokenizer.load(tokenizer_file), val_fraction=0.1, seed=0)
    return data


def held_out(data: Path, tokenizer, n_tokens: int) -> dict:
    """Token arrays nothing trains on: held-out documents and the last part of tinyshakespeare."""
    import numpy as np

    from llmkit.data.corpus import load_split

    texts = {"pydoc (held out)": np.asarray(load_split(data, "val")[:n_tokens], dtype=np.int64)}
    if SHAKESPEARE.exists():
        tail = SHAKESPEARE.read_text(encoding="utf-8")[-6 * n_tokens:]
        texts["tinyshakespeare (end)"] = np.asarray(tokenizer.encode(tail)[-n_tokens:], dtype=np.int64)
    return texts


def evaluate(model_dir, texts: dict, questions: bool) -> dict:
    from llmkit.eval.lm import perplexity
    from llmkit.infer.chat import ask
    from llmkit.io.resolve import resolve_model

    model, tok = resolve_model(model_dir)
    row = {"params": sum(p.numel() for p in set(model.parameters())), "layers": model.config.n_layer,
           "mlp": model.config.intermediate_size, "heads": model.config.n_head}
    for name, tokens in texts.items():
        row[name] = perplexity(model, tokens, block_size=256, batch_size=4)["perplexity"]
    if questions:
        row["answers"] = [ask(q, model, tok, out=None, max_new_tokens=40) for q in QUESTIONS]
    return row


def calibration_text(data: Path, tokenizer, n_tokens: int) -> Path:
    from llmkit.data.corpus import load_split

    path = data / "calibration.txt"
    if not path.exists():
        path.write_text(tokenizer.decode([int(t) for t in load_split(data, "train")[:n_tokens]]), encoding="utf-8")
    return path


def recover(args, out: Path, data: Path) -> dict:
    """Distil the pruned model from the original; a checkpoint every steps/4 (at most 10), so a run stopped early
    (e.g. out of time) still leaves a recovered model, reported with the steps it reached."""
    from llmkit.train.distill import run_distill

    target, info_file = out / "recovered", out / "recovery.json"
    if info_file.exists():
        return json.loads(info_file.read_text())
    if not (target / "model.safetensors").exists():
        overrides = [f"block_size={args.block_size}", f"batch_size={args.batch_size}", f"lr={args.lr}",
                     f"min_lr={args.lr / 10}", f"warmup_steps={max(1, args.steps // 10)}",
                     f"lr_decay_steps={args.steps}", "eval_interval=0", "eval_iters=1",
                     f"ckpt_interval={max(1, min(10, args.steps // 4))}",
                     "log_interval=1", "weight_decay=0.0", "device=cpu", f"threads={args.threads}",
                     "progress=false", "peak_flops=1e11"]
        run_distill(str(out / "original"), str(out / "pruned"), data, target, overrides,
                    temperature=1.0, alpha=args.alpha, top_k=args.top_k, max_steps=args.steps)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the trainer saves the data's tokenizer,
        shutil.copy(out / "original" / name, target / name)    # which has no chat template
    logged = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    info = {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"], "train_s": steps[-1]["elapsed"],
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]}
    info_file.write_text(json.dumps(info, indent=2))
    return info


def speed(dirs: list[Path], threads: int) -> list[dict]:
    cmd = [sys.executable, str(REPO / "benchmarks/prune_speed.py"), *map(str, dirs), "--json",
           "--threads", str(threads)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def report(results: dict) -> str:
    texts = [k for k in results["original"] if "(" in k]
    lines = ["| model | params | layers | MLP | " + " | ".join(f"ppl {t}" for t in texts)
             + " | decode tok/s (CPU time) | speed ratio |",
             "|---|---:|---:|---:|" + "---:|" * len(texts) + "---:|---:|"]
    for name in ("original", "pruned", "recovered", "unstructured-magnitude", "unstructured-wanda"):
        r = results.get(name)
        if r is None:
            continue
        cells = [f"{r[t]:.2f}" for t in texts]
        s = r.get("speed")
        lines.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['layers']} | {r['mlp']} | " + " | ".join(cells)
                     + (f" | {s['cpu_tok_s']:.1f} | {s['cpu_ratio']:.2f}x |" if s else " | - | - |"))
    for name in ("original", "pruned", "recovered"):
        for q, a in zip(QUESTIONS, results[name].get("answers", [])):
            lines.append(f"\n{name}: {q}\n    {a!r}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/prune_smollm2")
    parser.add_argument("--params", default="90M")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=60, help="distillation steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the teacher's soft targets")
    parser.add_argument("--top-k", type=int, default=None, help="cache the teacher's top-k logits (pays off "
                                                                 "over several epochs; a short run is under one)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--layer-tokens", type=int, default=1024, help="calibration tokens for layer removal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="original,pruned,recovery,recovered,unstructured,speed",
                        help="which to run (the others are read from OUT/results if there): run "
                             "'unstructured' in a second process beside the long recovery, for instance")
    args = parser.parse_args()

    import torch

    from llmkit.compress.prune import run_prune
    from llmkit.io.resolve import convert, resolve_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if not (out / "original" / "model.safetensors").exists():
        convert("smollm2-135m-instruct", out / "original")
    _, tok = resolve_model(out / "original")
    data = prepare_corpus(out, out / "original" / "tokenizer.json")
    calib = calibration_text(data, tok, args.calib_tokens)
    texts = held_out(data, tok, args.eval_tokens)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    stages = set(args.stages.split(","))
    (out / "results").mkdir(exist_ok=True)
    results = {}

    def stage(name, fn):  # one JSON file per result, saved as soon as it exists: a rerun (or a
        path = out / "results" / f"{name}.json"  # parallel run of other --stages) skips it
        if path.exists():
            results[name] = json.loads(path.read_text())
        elif name.split("-")[0] in stages or name in stages:
            results[name] = fn()
            path.write_text(json.dumps(results[name], indent=2))
            log(f"{name}: {results[name]}")

    def prune(name, **how):
        if not (out / name / "model.safetensors").exists():
            run_prune(out / "original", out / name, calib=calib, calib_tokens=args.calib_tokens,
                      layer_tokens=args.layer_tokens, log=log, **how)

    stage("original", lambda: evaluate(out / "original", texts, questions=True))
    if "pruned" in stages:
        prune("pruned", params=args.params, layers=args.layers)
    stage("pruned", lambda: evaluate(out / "pruned", texts, questions=True))
    stage("recovery", lambda: recover(args, out, data))
    stage("recovered", lambda: evaluate(out / "recovered", texts, questions=True))
    for method in ("magnitude", "wanda"):
        if "unstructured" in stages:
            prune(f"{method}-50%", sparsity=0.5, method=method)
        stage(f"unstructured-{method}", lambda: evaluate(out / f"{method}-50%", texts, questions=False))
    stage("speed", lambda: speed([out / "original", out / "pruned", out / "recovered"], 1))
    missing = {"original", "pruned", "recovery", "recovered", "speed"} - set(results)
    if missing:
        log(f"not yet measured: {', '.join(sorted(missing))}")
        return 0
    for row, name in zip(results["speed"], ("original", "pruned", "recovered")):
        results[name]["speed"] = row
    rec = results["recovery"]
    print(f"recovery: {rec['steps']} distillation steps, {rec['tokens']:,} tokens, {rec['train_s'] / 60:.1f} min "
          f"of training; distillation loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
