"""`llmkit demo` (what `make demo` runs): the whole pipeline on what the machine already has.

1. corpus: Python's own documentation (`pydoc_data.topics`, bundled with CPython; nothing downloaded),
2. a byte-level BPE tokenizer trained on it, and the corpus tokenized into shards,
3. a small Llama-style GPT trained for about two minutes on the CPU, with a live progress bar,
4. validation loss and perplexity, then samples from the freshly trained model,
5. one question to the embedded pretrained chat model (SmolLM2-135M-Instruct), answer streamed.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from llmkit.utils import atomic_open

# Sized so that training takes about two minutes on two CPU cores. The corpus is small (~0.5 MB), so
# a small vocabulary (more tokens per byte) and a few epochs at most keep validation loss honest.
DEMO_VOCAB = 1024
DEMO_MODEL = dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=192, dropout=0.1)
DEMO_TRAIN = dict(preset="llama-tiny", batch_size=16, block_size=128, max_steps=300, lr=2e-3, min_lr=2e-4,
                  warmup_steps=30, lr_decay_steps=300, eval_interval=100, eval_iters=20, log_interval=10,
                  ckpt_interval=0, weight_decay=0.1)
DEMO_PROMPTS = ["The for statement", "Exceptions are"]
DEMO_QUESTION = "What is the capital of France? Answer in one sentence."


def write_corpus(path: Path) -> int:
    """One JSONL document per documentation topic; returns the number of documents."""
    from pydoc_data.topics import topics

    with atomic_open(path, encoding="utf-8") as f:
        for name in sorted(topics):
            f.write(json.dumps({"text": topics[name].strip()}) + "\n")
    return len(topics)


def run(out_dir: str | Path = "runs/demo", max_steps: int | None = None, chat: bool = True,
        out=sys.stdout) -> dict:
    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.data.corpus import iter_texts, prepare
    from llmkit.infer.generate import generate
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.trainer import Trainer
    from llmkit.train.config import TrainConfig

    out_dir = Path(out_dir)
    corpus, data_dir, model_dir = out_dir / "corpus.jsonl", out_dir / "data", out_dir / "model"

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    n_docs = write_corpus(corpus)
    say(f"== 1. corpus: {n_docs} topics of Python's bundled documentation -> {corpus}")
    tokenizer = Tokenizer.train_bpe(iter_texts([corpus]), vocab_size=DEMO_VOCAB)
    meta = prepare([corpus], data_dir, tokenizer)
    say(f"== 2. byte-level BPE tokenizer ({tokenizer.vocab_size} tokens); "
        f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {data_dir}")

    steps = max_steps or DEMO_TRAIN["max_steps"]
    config = TrainConfig(**{**DEMO_TRAIN, "max_steps": steps, "lr_decay_steps": steps,
                            "eval_interval": min(DEMO_TRAIN["eval_interval"], steps)},
                         data_dir=str(data_dir), out_dir=str(model_dir), model=dict(DEMO_MODEL),
                         overwrite=True)  # the demo starts over each time
    trainer = Trainer(config)
    say(f"== 3. training a {trainer.raw_model.num_params() / 1e6:.2f}M-parameter Llama-style GPT "
        f"for {steps} steps ({config.batch_size}x{config.block_size} tokens each)")
    metrics = trainer.fit()
    val_loss = metrics["val_loss"]
    say(f"== 4. validation loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f} "
        f"(uniform guessing: {math.log(tokenizer.vocab_size):.3f} / {tokenizer.vocab_size}); "
        f"{metrics['tokens_per_s']:,.0f} tokens/s; model saved in {model_dir}")

    model, tokenizer = load_checkpoint(model_dir)
    samples = generate(model, tokenizer, DEMO_PROMPTS, max_new_tokens=60, temperature=0.8, top_k=50, seed=0)
    for prompt, completion in zip(DEMO_PROMPTS, samples):
        say(f"--- sample\n{prompt}{completion}")

    answer = None
    if chat:
        from llmkit.infer.chat import ask
        from llmkit.io.resolve import DEFAULT_MODEL

        say(f"\n== 5. the embedded pretrained chat model ({DEFAULT_MODEL}), asked through its chat template:")
        say(f"user: {DEMO_QUESTION}")
        out.write("assistant: ")
        answer = ask(DEMO_QUESTION, model=DEFAULT_MODEL, out=out, max_new_tokens=64)
    return {"val_loss": val_loss, "samples": samples, "answer": answer, "model_dir": str(model_dir)}
