"""A smaller, faster SmolLM2: structured pruning to about two thirds of the parameters, then recovery by
distilling from the original, on the CPU. Also unstructured 50% sparsity, magnitude against Wanda.

    python examples/prune_distill_smollm2.py [--out runs/prune_smollm2] [--params 90M] [--layers 24]
        [--heads N] [--steps 120] [--lr 3e-4] [--top-k K] [--chunk-minutes M] [--threads 2]

1. SmolLM2-135M-Instruct (the embedded GGUF) is converted to an llmkit directory: the original;
2. Python's bundled documentation (pydoc_data.topics) is tokenized with its tokenizer; a tenth of the
   documents is held out; calibration text is the start of the training split;
3. `llmkit prune --params 90M --layers 24`: the 6 layers whose removal costs least loss go, then the MLP
   is narrowed (least-contributing channels first) until the model fits 90M parameters;
4. `llmkit distill`: the pruned model learns the original's next-token distributions (KL at temperature 1
   plus a little cross-entropy; warmup, then cosine to a tenth of the peak LR) on the pydoc training
   documents and the start of tinyshakespeare. The teacher runs beside the student: ~30 minutes see less
   than one pass over this corpus, where caching its top-k logits (--top-k K) would not pay off;
5. perplexity on held-out text (the held-out documents, and the end of tinyshakespeare, which no step
   trains on) before pruning, right after, after recovery; greedy answers to a few questions; decode
   speed side by side (benchmarks/prune_speed.py); unstructured 50% magnitude vs Wanda perplexity.
Steps whose output exists are not redone, so an interrupted run continues; --stages runs some of them
(e.g. the unstructured ones in a second process beside the long recovery). With --chunk-minutes M each
call trains about M minutes, checkpoints and stops (call again until the table appears), so the run fits
the slots of a shared machine. Results go to OUT/results/ and, once all are there, a Markdown table on stdout.
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
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"  # beside the checkout, as CI lays it out
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


def held_out(data: Path, tokenizer, n_tokens: int, shakespeare: Path) -> dict:
    """Token arrays nothing trains on: held-out documents and the last part of tinyshakespeare."""
    import numpy as np

    from llmkit.data.corpus import load_split

    texts = {"pydoc (held out)": np.asarray(load_split(data, "val")[:n_tokens], dtype=np.int64)}
    tail = shakespeare.read_text(encoding="utf-8")[-6 * n_tokens:]
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


def recovery_data(out: Path, data: Path, tokenizer, eval_tokens: int, shakespeare: Path, shakespeare_chars: int) -> Path:
    """What recovery trains on: the pydoc training documents and the start of tinyshakespeare, never the
    held-out pydoc documents (kept as the validation split) nor the end of tinyshakespeare that is evaluated."""
    import numpy as np

    from llmkit.data.corpus import load_meta, load_split

    target = out / "recovery-data"
    if (target / "meta.json").exists():
        return target
    parts = [np.asarray(load_split(data, "train"))]
    if shakespeare_chars:
        text = shakespeare.read_text(encoding="utf-8")
        if shakespeare_chars > len(text) - 12 * eval_tokens:  # the evaluated tail is the last 6 * eval_tokens
            raise SystemExit(f"--shakespeare-chars {shakespeare_chars} reaches the held-out end of the text")
        ids = tokenizer.encode(text[:shakespeare_chars]) + [tokenizer.eos_id]
        parts.append(np.asarray(ids, dtype=parts[0].dtype))
    target.mkdir()
    train = np.concatenate(parts)
    train.tofile(target / "train.bin")
    shutil.copy(data / "val.bin", target / "val.bin")
    shutil.copy(data / "tokenizer.json", target / "tokenizer.json")
    meta = {**load_meta(data), "train_tokens": len(train), "sources": ["pydoc_data.topics (train documents)",
            f"tinyshakespeare.txt[:{shakespeare_chars}]"]}
    (target / "meta.json").write_text(json.dumps(meta, indent=2))  # last: it marks the directory complete
    return target


def recover(args, out: Path, data: Path) -> dict | None:
    """Distil the pruned model from the original, at most --chunk-minutes per call: each call resumes the
    last checkpoint (and the cached teacher logits), so the run survives interruptions and fits the slots
    of a shared machine. Returns None until all --steps are done."""
    from llmkit.io import snapshots
    from llmkit.train.distill import CACHE_FILE, run_distill

    target = out / "recovered"
    done = read_steps(target)
    if done < args.steps:
        # steps per call from the measured step time; the first call also caches the teacher's logits
        per_step = mean_step_s(target)
        if args.chunk_minutes <= 0:
            chunk = args.steps - done
        else:
            chunk = max(1, int(args.chunk_minutes * 60 / per_step)) if per_step else args.first_chunk
        overrides = [f"block_size={args.block_size}", f"batch_size={args.batch_size}", f"lr={args.lr}",
                     f"min_lr={args.lr / 10}", f"warmup_steps={max(1, args.steps // 20)}",
                     f"lr_decay_steps={args.steps}", "eval_interval=0", "eval_iters=4",
                     f"ckpt_interval={chunk}", "log_interval=5", "weight_decay=0.0", "device=cpu",
                     f"threads={args.threads}", "progress=false", "peak_flops=1e11"]
        run_distill(str(out / "original"), str(out / "pruned"), data, target, overrides,
                    temperature=args.temperature, alpha=args.alpha, top_k=args.top_k or None,
                    max_steps=min(args.steps, done + chunk), resume=snapshots.current(target) is not None)
        done = read_steps(target)
        if done < args.steps:
            print(f"recovery at step {done} of {args.steps}; run again to continue", file=sys.stderr)
            return None
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the trainer saves the data's tokenizer,
        shutil.copy(out / "original" / name, target / name)    # which has no chat template
    logged = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    cache_s = 0.0
    if args.top_k:
        from safetensors import safe_open

        with safe_open(str(target / CACHE_FILE), "pt") as f:
            cache_s = float(f.metadata()["seconds"])
    return {"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"], "train_s": steps[-1]["elapsed"],
            "teacher_cache_s": cache_s, "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "val_loss": [r["val_loss"] for r in logged if "val_loss" in r][-1], "lr": args.lr,
            "batch": f"{args.batch_size}x{args.block_size}", "top_k": args.top_k, "alpha": args.alpha,
            "temperature": args.temperature}


def read_steps(run: Path) -> int:
    """The step of the run's last checkpoint (its directory is named after it), 0 before the first."""
    from llmkit.io import snapshots

    step_dir = snapshots.latest(run)
    return 0 if step_dir is None else int(step_dir.name.removeprefix("step-"))


def mean_step_s(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    times = [json.loads(line).get("ms_per_step") for line in path.read_text().splitlines()]
    times = [t for t in times if t]
    return sum(times) / len(times) / 1000 if times else None


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
    parser.add_argument("--heads", type=int, default=None, help="query heads kept per layer (whole KV groups)")
    parser.add_argument("--steps", type=int, default=120, help="distillation steps (the LR schedule's length)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak LR (warmup, then cosine to a tenth)")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the teacher's soft targets")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0,
                        help="cache the teacher's top-k logits once over the corpus (pays off beyond one epoch); "
                             "0: run the teacher beside the student, full distributions")
    parser.add_argument("--shakespeare", type=Path, default=SHAKESPEARE, help="tinyshakespeare.txt")
    parser.add_argument("--shakespeare-chars", type=int, default=200_000,
                        help="train also on this many characters from the start of tinyshakespeare")
    parser.add_argument("--chunk-minutes", type=float, default=0,
                        help="train about this long per call, then checkpoint and stop: call again to continue "
                             "(0: all steps in one call)")
    parser.add_argument("--first-chunk", type=int, default=10, help="steps of the first call (no step time yet)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--layer-tokens", type=int, default=1024, help="calibration tokens for layer removal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", default="original,pruned,recovery,recovered,unstructured,speed",
                        help="which to run (the others are read from OUT/results if there): run "
                             "'unstructured' in a second process beside the long recovery, for instance")
    args = parser.parse_args()
    if not args.shakespeare.is_file():
        parser.error(f"{args.shakespeare} is missing: give --shakespeare PATH (tinyshakespeare.txt)")

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
    texts = held_out(data, tok, args.eval_tokens, args.shakespeare)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    stages = set(args.stages.split(","))
    (out / "results").mkdir(exist_ok=True)
    results = {}

    def stage(name, fn):  # one JSON file per result, saved as soon as it exists: a rerun (or a
        path = out / "results" / f"{name}.json"  # parallel run of other --stages) skips it
        if path.exists():
            results[name] = json.loads(path.read_text())
        elif name.split("-")[0] in stages or name in stages:
            result = fn()
            if result is not None:  # None: not finished (a recovery continues on the next call)
                results[name] = result
                path.write_text(json.dumps(result, indent=2))
                log(f"{name}: {result}")

    def prune(name, **how):
        if not (out / name / "model.safetensors").exists():
            run_prune(out / "original", out / name, calib=calib, calib_tokens=args.calib_tokens,
                      layer_tokens=args.layer_tokens, log=log, **how)

    stage("original", lambda: evaluate(out / "original", texts, questions=True))
    if "pruned" in stages:
        prune("pruned", params=args.params, layers=args.layers, heads=args.heads)
    stage("pruned", lambda: evaluate(out / "pruned", texts, questions=True))
    stage("recovery", lambda: recover(args, out, recovery_data(out, data, tok, args.eval_tokens, args.shakespeare,
                                                               args.shakespeare_chars)))
    if "recovery" in results:  # a recovery still under way is not evaluated
        stage("recovered", lambda: evaluate(out / "recovered", texts, questions=True))
    for method in ("magnitude", "wanda"):
        if "unstructured" in stages:
            prune(f"{method}-50%", sparsity=0.5, method=method)
        stage(f"unstructured-{method}", lambda: evaluate(out / f"{method}-50%", texts, questions=False))
    if "recovered" in results:
        stage("speed", lambda: speed([out / "original", out / "pruned", out / "recovered"], 1))
    missing = {"original", "pruned", "recovery", "recovered", "speed"} - set(results)
    if missing:
        log(f"not yet measured: {', '.join(sorted(missing))}")
        return 0
    for row, name in zip(results["speed"], ("original", "pruned", "recovered")):
        results[name]["speed"] = row
    rec = results["recovery"]
    teacher = (f"teacher top-{rec['top_k']} logits cached in {rec['teacher_cache_s'] / 60:.1f} min + " if rec["top_k"]
               else "teacher run beside the student, ")
    print(f"recovery: {(rec['teacher_cache_s'] + rec['train_s']) / 60:.1f} min = {teacher}{rec['steps']} distillation "
          f"steps of {rec['batch']} tokens (peak lr {rec['lr']:g}) {rec['train_s'] / 60:.1f} min, {rec['tokens']:,} "
          f"tokens; distillation loss {rec['first_loss']:.3f} -> {rec['last_loss']:.3f}, held-out loss "
          f"{rec['val_loss']:.3f}")
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
