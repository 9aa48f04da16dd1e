"""Time to first token of each turn of a multi-turn chat, with the engine's prefix reuse and without.

A chat resends the whole conversation every turn; the engine keeps the keys/values of the last
prompt (serve/prefill.py) and recomputes only what follows the shared prefix. "without" drops
that kept prompt before each turn, so every prompt is computed from scratch. Both sides run the
same engine on the same model in this process, one request at a time, greedy, with fixed replies
(ignore_eos) so the prompts are the same.

    python benchmarks/prefix_reuse.py [--model smollm2-135m-instruct] [--turns 5] [--reply-tokens 48]
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import time

import torch

from llmkit.infer.sampling import SamplingParams
from llmkit.io.resolve import resolve_model
from llmkit.serve.engine import Engine

SYSTEM = ("You are a careful assistant for a gardening shop. Answer briefly, name plants by their common and "
          "Latin names, mention watering and light needs, warn about plants that are toxic to cats or dogs, "
          "and suggest one companion plant when it helps. ") * 3
QUESTIONS = ["Which roses suit a small balcony?", "How often should I water them in July?",
             "Are they safe for my cat?", "What could I plant next to them?", "And in winter, what do I do?",
             "Which fertiliser do you recommend?", "How do I prune them?"]


async def turn_ttft(engine, prompt: list[int], reply_tokens: int) -> tuple[float, str]:
    params = SamplingParams(max_new_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    job = engine.submit([prompt], params)
    first, text, done = None, [], False
    while not done:
        ev = await job.events.get()
        if ev.token and first is None:
            first = time.perf_counter() - start
        text.append(ev.text)
        done = ev.finish is not None
    return first, "".join(text)


async def chat(engine, tok, turns: int, reply_tokens: int, reuse: bool) -> list[tuple[int, float]]:
    messages, out = [{"role": "system", "content": SYSTEM}], []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        prompt = tok.encode(tok.apply_chat_template(messages))
        if not reuse:
            engine._prefiller.reset()  # forget the kept prompt: this turn is computed from scratch
        ttft, reply = await turn_ttft(engine, prompt, reply_tokens)
        messages.append({"role": "assistant", "content": reply})
        out.append((len(prompt), ttft))
    return out


async def main_async(args):
    model, tok = resolve_model(args.model)
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        await chat(engine, tok, 2, 4, True)  # warm-up: kernels, allocations
        rows = {}
        for reuse in (False, True):
            rows[reuse] = await chat(engine, tok, args.turns, args.reply_tokens, reuse)
    finally:
        engine.stop()
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}; "
          f"model {args.model}; one request at a time")
    print(f"{'turn':>4} {'prompt tokens':>14} {'TTFT without (s)':>17} {'TTFT with reuse (s)':>20} {'speed-up':>9}")
    for i, ((n, without), (_, with_)) in enumerate(zip(rows[False], rows[True]), 1):
        print(f"{i:>4} {n:>14} {without:>17.3f} {with_:>20.3f} {without / with_:>8.1f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--reply-tokens", type=int, default=48)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
