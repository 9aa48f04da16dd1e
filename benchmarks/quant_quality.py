"""Quantization quality: held-out perplexity of fp32, q8_0, q4_0 and q4_1 weights (round-to-nearest and
GPTQ), and how many of a dozen chat prompts get q8_0 greedy answers equal to fp32's.

    python benchmarks/quant_quality.py [--models smollm2,trained] [--trained DIR] [--train-out DIR]
        [--train-steps 1000] [--text tinyshakespeare.txt] [--eval-chars 20000] [--calib-tokens 8192]
        [--formats q8_0,q4_0,q4_1] [--methods rtn,gptq] [--prompts 12] [--new-tokens 32] [--threads 2]

Models:
  smollm2  SmolLM2-135M-Instruct; its fp32 reference is the embedded Q4_1 GGUF expanded to float32 (the
           only weights shipped), so its linear weights already lie on a Q4_1 grid: q4_1 by round-to-nearest
           gives those same blocks back. The file itself, "as stored", is a row of its own.
  trained  a character-level model (preset char-tiny: 4 layers, 128 wide) trained here on the first 90%
           of --text for --train-steps (a few minutes on 2 cores); --trained DIR measures a model you
           name instead, --train-out DIR keeps the one trained here (run the two models as separate chunks).
Texts: the held-out text is the last 10% of --text (its first --eval-chars characters); the calibration
text is the first --calib-tokens tokens of the file (disjoint from it). Every quantized model is written
as `llmkit quantize` writes it and loaded as `llmkit generate` loads it (blocks kept). The embedding (and
tied LM head) is q8_0 in every quantized row, as `llmkit quantize` stores it.
Greedy agreement (smollm2 only): --prompts chat prompts, --new-tokens greedy tokens each, fp32 vs each
q8_0 row and the GGUF as stored, through llmkit.infer.generate as `llmkit chat` runs it.
Prints the CPU line and Markdown tables; a JSON line per table with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine import cpu_isas, cpu_name  # noqa: E402

SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"
SMOLLM2 = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?", "What is 12 times 7?", "Name three primary colors.",
    "Write a haiku about the sea.", "Why is the sky blue?", "Give me a tip for sleeping better.",
    "What does a CPU do?", "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?",
    "List two uses of baking soda.", "What is the boiling point of water in Celsius?",
    "Explain what a prime number is.",
]


def held_out_and_calibration(text: str, tokenizer, eval_chars: int, calib_tokens: int):
    """(held-out tokens, calibration tokens): the last 10% of the text, and the file's first tokens."""
    split = int(len(text) * 0.9)
    held_out = torch.tensor(tokenizer.encode(text[split:split + eval_chars]))
    calibration = torch.tensor(tokenizer.encode(text[:min(split, calib_tokens * 8)])[:calib_tokens])
    return held_out, calibration


def train_char_model(text: str, out: Path, steps: int, threads: int) -> Path:
    """A char-tiny model trained on the first 90% of `text` (the held-out 10% is never seen)."""
    from llmkit.data.corpus import prepare
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.trainer import TrainConfig, Trainer

    split = int(len(text) * 0.9)
    train_file = out.parent / "train.txt"
    train_file.write_text(text[:split], encoding="utf-8")
    prepare([train_file], out.parent / "data", Tokenizer.train_char([text]), val_fraction=0.05)
    config = TrainConfig(data_dir=str(out.parent / "data"), out_dir=str(out), preset="char-tiny",
                         model={"block_size": 128}, block_size=128, batch_size=16, max_steps=steps, lr=2e-3,
                         min_lr=2e-4, eval_interval=0, eval_iters=20, log_interval=100, ckpt_interval=0,
                         progress=False, seed=1, threads=threads)
    result = Trainer(config).fit()
    print(f"trained {out}: {steps} steps, val loss {result['val_loss']:.4f}", flush=True)
    return out


def ppl(model, tokens, window: int) -> float:
    from llmkit.eval.lm import perplexity

    return perplexity(model, tokens, block_size=window, batch_size=4)["perplexity"]


def measure_perplexities(name, args, work: Path, held_out, calibration) -> tuple[list[dict], dict]:
    """One row per weight variant: fp32, then each format x method; returns the rows and the models'
    directories (for the greedy comparison)."""
    from llmkit.compress.quantize import input_hessians, quantize_model, quantized_modules, save_quantized
    from llmkit.io.resolve import resolve_model

    model, tokenizer = resolve_model(name, dtype="float32")
    window = min(args.window, model.config.block_size)
    started = time.perf_counter()
    rows = [{"weights": "fp32", "ppl": ppl(model, held_out, window), "quantize_s": 0.0,
             "eval_s": time.perf_counter() - started}]
    hessians = None
    dirs = {}
    for fmt in args.formats:
        for method in args.methods:
            started = time.perf_counter()
            if method == "gptq" and hessians is None:  # one calibration pass serves every format
                hessians = input_hessians(model, quantized_modules(model), calibration, window)
            weights = quantize_model(model, fmt, method, calibration, window, hessians=hessians)
            out = save_quantized(work / f"{fmt}-{method}", model, tokenizer, weights)
            quantize_s = time.perf_counter() - started
            started = time.perf_counter()
            quantized, _ = resolve_model(out)  # blocks kept, as `llmkit generate` loads it
            rows.append({"weights": f"{fmt} {method.upper() if method == 'rtn' else 'GPTQ'}",
                         "ppl": ppl(quantized, held_out, window), "quantize_s": quantize_s,
                         "eval_s": time.perf_counter() - started})
            dirs[rows[-1]["weights"]] = out
            print(f"  {rows[-1]}", flush=True)
    return rows, dirs


def perplexity_table(title: str, rows: list[dict], tokens: int) -> str:
    base = rows[0]["ppl"]
    lines = [f"**{title}** ({tokens} held-out tokens)", "",
             "| weights | perplexity | vs fp32 | quantize s | load + eval s |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        change = "" if row is rows[0] else f"{100 * (row['ppl'] / base - 1):+.2f}%"
        lines.append(f"| {row['weights']} | {row['ppl']:.4f} | {change} | {row['quantize_s']:.1f} | "
                     f"{row['eval_s']:.1f} |")
    return "\n".join(lines)


def greedy_answers(model_dir, prompts: list[str], new_tokens: int, dtype=None) -> list[str]:
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.infer.generate import generate
    from llmkit.io.resolve import resolve_model

    model, tok = resolve_model(model_dir, dtype=dtype)
    model = optimize_for_inference(model, single_row=True)  # as `llmkit chat` runs it
    return [generate(model, tok, tok.apply_chat_template([{"role": "user", "content": p}]),
                     max_new_tokens=new_tokens, temperature=0) for p in prompts]


def greedy_table(dirs: dict, args) -> tuple[str, dict]:
    prompts = PROMPTS[:args.prompts]
    reference = greedy_answers(SMOLLM2, prompts, args.new_tokens, dtype="float32")
    candidates = {k: v for k, v in dirs.items() if k.startswith("q8_0")}
    candidates["Q4_1 GGUF as stored"] = SMOLLM2
    lines = [f"**Greedy answers equal to fp32's** ({len(prompts)} chat prompts, {args.new_tokens} new tokens each)",
             "", "| weights | equal | first differing prompt |", "|---|---:|---|"]
    counts = {}
    for label, path in candidates.items():
        answers = greedy_answers(path, prompts, args.new_tokens)
        same = [a == r for a, r in zip(answers, reference)]
        counts[label] = sum(same)
        first = next((f"{prompts[i]!r}: {answers[i]!r} vs {reference[i]!r}" for i, s in enumerate(same) if not s), "")
        lines.append(f"| {label} | {sum(same)} of {len(prompts)} | {first.replace('|', '/')} |")
    return "\n".join(lines), counts


def run_smollm2(args, text: str, work: Path) -> list[tuple[str, dict]]:
    from llmkit.io.resolve import resolve_model

    _, tokenizer = resolve_model(SMOLLM2, dtype="quantized")
    held_out, calibration = held_out_and_calibration(text, tokenizer, args.eval_chars, args.calib_tokens)
    rows, dirs = measure_perplexities(SMOLLM2, args, work, held_out, calibration)
    started = time.perf_counter()
    stored, _ = resolve_model(SMOLLM2)  # the GGUF's own blocks
    rows.append({"weights": "Q4_1 GGUF as stored", "ppl": ppl(stored, held_out, args.window), "quantize_s": 0.0,
                 "eval_s": time.perf_counter() - started})
    out = [(perplexity_table(f"SmolLM2-135M-Instruct, window {args.window}", rows, len(held_out) - 1),
            {"model": SMOLLM2, "rows": rows})]
    if args.prompts:
        started = time.perf_counter()
        table, counts = greedy_table(dirs, args)
        out.append((table + f"\n\n(greedy comparison took {time.perf_counter() - started:.0f} s)",
                    {"model": SMOLLM2, "greedy_equal": counts, "prompts": args.prompts}))
    return out


def run_trained(args, text: str, work: Path) -> list[tuple[str, dict]]:
    from llmkit.io.resolve import resolve_model

    started = time.perf_counter()
    if args.trained:
        path = Path(args.trained)
    else:
        path = Path(args.train_out) if args.train_out else work / "trained" / "model"
        path.parent.mkdir(parents=True, exist_ok=True)
        train_char_model(text, path, args.train_steps, args.threads)
    train_s = time.perf_counter() - started
    model, tokenizer = resolve_model(path, dtype="float32")
    held_out, calibration = held_out_and_calibration(text, tokenizer, args.eval_chars, args.calib_tokens)
    rows, _ = measure_perplexities(path, args, work, held_out, calibration)
    config = model.config
    title = (f"{'trained here' if not args.trained else path}: {config.n_layer} layers x {config.n_embd}, "
             f"vocab {config.vocab_size}, window {min(args.window, config.block_size)}"
             + (f", trained {args.train_steps} steps in {train_s:.0f} s" if not args.trained else ""))
    return [(perplexity_table(title, rows, len(held_out) - 1), {"model": str(path), "rows": rows})]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,trained")
    parser.add_argument("--trained", help="a trained llmkit model to measure instead of training one")
    parser.add_argument("--train-out", help="where to keep the model trained here (default: a temporary folder)")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--text", default=str(SHAKESPEARE), help="training, calibration and held-out text")
    parser.add_argument("--eval-chars", type=int, default=20000)
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512, help="perplexity window (capped at the context)")
    parser.add_argument("--formats", default="q8_0,q4_0,q4_1")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per table")
    args = parser.parse_args(argv)
    args.formats, args.methods = args.formats.split(","), args.methods.split(",")
    args.models = args.models.split(",")
    if not Path(args.text).is_file():
        parser.error(f"no text file {args.text} (pass --text PATH)")
    if unknown := set(args.models) - {"smollm2", "trained"}:
        parser.error(f"unknown models {sorted(unknown)} (smollm2, trained)")
    if not 0 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be 0..{len(PROMPTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from llmkit.infer import quant

    print(f"{cpu_name()} ({' '.join(i.upper() for i in cpu_isas())}); quantized kernels: {quant.isa_name()}; "
          f"torch {torch.__version__}, {args.threads} threads; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"held-out text: the last 10% of {Path(args.text).name} (first {args.eval_chars} characters); "
          f"calibration: its first {args.calib_tokens} tokens\n", flush=True)
    text = Path(args.text).read_text(encoding="utf-8")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        results = []
        for name in args.models:
            results += (run_smollm2 if name == "smollm2" else run_trained)(args, text, Path(work) / name)
    for table, record in results:
        print("\n" + table)
        if args.json:
            print(json.dumps(record))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
