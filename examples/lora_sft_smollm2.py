"""LoRA fine-tuning of SmolLM2-135M-Instruct to a new, checkable behaviour, on CPU.

The behaviour: every reply is a single JSON object {"answer": "..."} and nothing else.
The stock model answers in prose, so on held-out questions (other kinds of question than
those trained on) the behaviour is absent before fine-tuning and present after it.

    python examples/lora_sft_smollm2.py                 # ~3-5 minutes on 2 CPU cores
    python examples/lora_sft_smollm2.py --steps 60 --out runs/json-lora

The run leaves the adapter (adapter.safetensors, a few MB) and the merged model in --out;
`llmkit chat --model OUT` then talks to the fine-tuned model.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

COUNTRIES = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Peru", "Lima"),
             ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Cuba", "Havana")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("happy", "sad"), ("early", "late"), ("full", "empty"), ("old", "young"), ("hard", "soft")]
COLOURS = [("the sky on a clear day", "blue"), ("grass", "green"), ("snow", "white"), ("a ripe banana", "yellow"),
           ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a flamingo", "pink")]
# Held out: kinds of question never seen in training.
HELD_OUT = ["Who wrote Romeo and Juliet?", "How many days are in a week?", "What animal says moo?",
            "What is the largest planet in the solar system?", "Which language is spoken in Brazil?",
            "What do bees make?"]


def training_chats(n: int, seed: int = 0) -> list[dict]:
    """`n` conversations: varied questions, every reply a one-key JSON object."""
    rng = random.Random(seed)
    makers = [
        lambda: (f"What is the capital of {(c := rng.choice(COUNTRIES))[0]}?", c[1]),
        lambda: (f"What is {(a := rng.randint(2, 40))} plus {(b := rng.randint(2, 40))}?", str(a + b)),
        lambda: (f"What is the opposite of {(o := rng.choice(OPPOSITES))[0]}?", o[1]),
        lambda: (f"What colour is {(c := rng.choice(COLOURS))[0]}?", c[1]),
        lambda: (f"Name the capital city of {(c := rng.choice(COUNTRIES))[0]}, please.", c[1]),
    ]
    chats = []
    for _ in range(n):
        question, answer = rng.choice(makers)()
        chats.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": json.dumps({"answer": answer})}]})
    return chats


def is_json_answer(reply: str) -> bool:
    """The behaviour: the whole reply is a JSON object with exactly one key, "answer"."""
    try:
        value = json.loads(reply.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"]


def ask(model, tokenizer, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    from llmkit.infer.sampling import SamplingParams
    from llmkit.infer.generate import generate

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    return generate(model, tokenizer, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))


def report(title: str, questions: list[str], replies: list[str]) -> float:
    hits = [is_json_answer(r) for r in replies]
    print(f"\n{title}: {sum(hits)}/{len(hits)} replies are {{\"answer\": ...}} JSON")
    for q, r, ok in zip(questions, replies, hits):
        print(f"  [{'x' if ok else ' '}] {q} -> {r.strip()[:70]!r}")
    return sum(hits) / len(hits)


def run(out: str, steps: int = 40, batch_size: int = 8, lr: float = 2e-3, rank: int = 8,
        n_train: int = 256, model: str = "smollm2-135m-instruct", threads: int | None = None,
        log=print) -> tuple[float, float]:
    """Train, then return the fraction of held-out replies showing the behaviour (before, after)."""
    from llmkit.model.lora import LoRAConfig
    from llmkit.io.resolve import resolve_model
    from llmkit.train.sft import SFTTrainer
    from llmkit.train.config import TrainConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in training_chats(n_train)), encoding="utf-8")

    base, tokenizer = resolve_model(model, dtype="float32")  # the float weights LoRA trains on
    before = report("before fine-tuning", HELD_OUT, ask(base, tokenizer, HELD_OUT))
    del base

    config = TrainConfig(data_dir=str(data), out_dir=str(out), block_size=96, batch_size=batch_size,
                         max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10),
                         lr_decay_steps=steps, weight_decay=0.0, eval_interval=0, log_interval=5,
                         ckpt_interval=0, progress=False, threads=threads)
    started = time.perf_counter()
    trainer = SFTTrainer(config, model=model, lora=LoRAConfig(rank=rank, alpha=2 * rank), val_fraction=0.0, log=log)
    metrics = trainer.fit()
    log(f"trained {steps} steps in {time.perf_counter() - started:.0f} s; final loss {metrics['loss']:.4f}, "
        f"{metrics['tokens_per_s']:.0f} tokens/s")
    tuned = trainer.raw_model.eval()  # adapters still on; out/ also holds the merged model
    after = report("after LoRA fine-tuning", HELD_OUT, ask(tuned, tokenizer, HELD_OUT))
    return before, after


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lora-json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is faster when other work shares the cores)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    before, after = run(args.out, args.steps, args.batch_size, args.lr, args.rank, threads=args.threads)
    print(f"\nbehaviour on held-out prompts: {before:.0%} before, {after:.0%} after")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
