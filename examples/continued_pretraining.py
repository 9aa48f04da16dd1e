"""Domain-adaptive continued pretraining: keep pretraining SmolLM2-135M-Instruct on Python's documentation.

    nice -n 10 python examples/continued_pretraining.py [--out runs/cpt] [--steps 8] [--eval-tokens 2048]

1. corpus: Python's documentation topics (pydoc_data.topics, bundled with CPython), one document each;
   `llmkit prepare` with the model's own tokenizer holds out whole documents for validation;
2. `llmkit train --init-from smollm2-135m-instruct` (the embedded GGUF, dequantized to float32);
3. perplexity before and after on held-out documentation and on general text (tinyshakespeare, or this
   script's docstrings where it is missing), to show what is gained and what is forgotten.

Sized for two shared CPU cores (a few CPU-minutes): 8 steps of 2 x 128 tokens, perplexity on 2048
tokens of each text; more steps adapt further. The same run from the command line:
    llmkit prepare runs/cpt/pydoc.jsonl --out runs/cpt/data --tokenizer smollm2-135m-instruct
    llmkit train --init-from smollm2-135m-instruct --data runs/cpt/data --out runs/cpt/model \
        block_size=128 batch_size=2 lr=2e-4 min_lr=2e-5 warmup_steps=1 weight_decay=0 --max-steps 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
SHAKESPEARE = Path(__file__).resolve().parents[1] / "../shared/data/tinyshakespeare.txt"


def write_corpus(path: Path) -> None:
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for name in sorted(topics):
            f.write(json.dumps({"text": topics[name].strip()}) + "\n")


def general_text() -> tuple[str, str]:
    for candidate in (SHAKESPEARE, Path("/work/shared/data/tinyshakespeare.txt")):
        if candidate.is_file():
            return "tinyshakespeare", candidate.read_text(encoding="utf-8")[-60_000:]  # its end: unseen prose
    raise SystemExit("tinyshakespeare.txt not found (expected under ../shared/data)")


def perplexities(model, held_out, general, n_tokens: int) -> dict:
    import torch

    from llmkit.eval.lm import perplexity

    with torch.no_grad():
        return {name: perplexity(model, tokens[:n_tokens + 1], block_size=256, batch_size=4)["perplexity"]
                for name, tokens in (("held-out Python docs", held_out), (general[0], general[1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/cpt")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval-tokens", type=int, default=2048, help="tokens of each text to score")
    args = parser.parse_args()
    import torch

    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.data.corpus import load_split, prepare
    from llmkit.io.resolve import load_tokenizer, resolve_model
    from llmkit.train.trainer import Trainer, load_train_config

    torch.set_num_threads(2)
    out = Path(args.out)
    write_corpus(out / "pydoc.jsonl")
    tokenizer = load_tokenizer(MODEL)
    meta = prepare([out / "pydoc.jsonl"], out / "data", tokenizer, val_fraction=0.1, seed=0)
    print(f"corpus: {meta['documents']} documents, {meta['train_tokens']:,} train / {meta['val_tokens']:,} "
          f"held-out tokens (whole documents)")
    held_out = load_split(out / "data", "val")
    name, text = general_text()
    general = (name, tokenizer.encode(text))

    base, _ = resolve_model(MODEL, dtype="float32")  # as training starts from it
    t0 = time.perf_counter()
    before = perplexities(base, held_out, general, args.eval_tokens)
    del base
    config = load_train_config(None, [
        f"data_dir={out / 'data'}", f"out_dir={out / 'model'}", f"init_from={MODEL}", "overwrite=true",
        "block_size=128", "batch_size=2", f"max_steps={args.steps}", "lr=2e-4", "min_lr=2e-5", "warmup_steps=1",
        f"lr_decay_steps={args.steps}", "weight_decay=0.0", "eval_interval=0", "log_interval=1", "ckpt_interval=0",
        "threads=2"])
    metrics = Trainer(config).fit()
    adapted, _ = load_checkpoint(out / "model")
    after = perplexities(adapted, held_out, general, args.eval_tokens)

    print(f"\n{MODEL}, {args.steps} steps x {2 * 128} tokens of Python docs (last train loss {metrics['loss']:.3f}); "
          f"perplexity on {args.eval_tokens} tokens each, {time.perf_counter() - t0:.0f} s in all\n")
    print("| text | before | after | change |\n|---|---:|---:|---:|")
    for key in before:
        print(f"| {key} | {before[key]:.2f} | {after[key]:.2f} | {100 * (after[key] / before[key] - 1):+.1f}% |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
