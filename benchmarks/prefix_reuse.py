"""Time to first token of each turn of a multi-turn chat, with the engine's prefix reuse and without.

A chat resends the whole conversation every turn; the engine keeps the keys/values of the last
prompt and of finished replies with their prompts (serve/prefill.py) and recomputes only what
follows the longest shared prefix. Each chat starts with nothing kept; "without" drops everything
kept before each turn, so every prompt is computed from scratch. "reused" counts the prompt tokens
of a turn that were copied. Each turn runs --repeats times from the same kept state (median shown).
Both sides run the same engine on the same model in this process, one request at a time, greedy,
with fixed replies (ignore_eos) so the prompts are the same.

    python benchmarks/prefix_reuse.py [--model smollm2-135m-instruct] [--turns 5] [--reply-tokens 48] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from llmkit.infer.sampling import SamplingParams
from llmkit.io.resolve import resolve_model
from llmkit.serve.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_isas, cpu_name  # noqa: E402

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


async def chat(engine, tok, turns: int, reply_tokens: int, reuse: bool,
               repeats: int) -> list[tuple[int, float, int]]:
    """(prompt tokens, median TTFT of `repeats` runs, prompt tokens reused) per turn of one chat; each
    repeat of a turn starts from what the previous turn left kept."""
    pf = engine._prefiller
    pf.reset()  # each chat starts with nothing kept
    messages, out = [{"role": "system", "content": SYSTEM}], []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        prompt = tok.encode(tok.apply_chat_template(messages))
        kept, times = (list(pf._kept), pf._last), []
        for _ in range(repeats):
            pf._kept, pf._last = (list(kept[0]), kept[1]) if reuse else ([], None)
            before = pf.reused_tokens
            ttft, reply = await turn_ttft(engine, prompt, reply_tokens)
            times.append(ttft)
        messages.append({"role": "assistant", "content": reply})
        out.append((len(prompt), statistics.median(times), pf.reused_tokens - before))
    return out


async def main_async(args):
    model, tok = resolve_model(args.model)
    engine = Engine(model, tok, max_batch=4)
    engine.start()
    try:
        await chat(engine, tok, 2, 4, True, 1)  # warm-up: kernels, allocations
        rows = {}
        for reuse in (False, True):
            rows[reuse] = await chat(engine, tok, args.turns, args.reply_tokens, reuse, args.repeats)
    finally:
        engine.stop()
    print(f"{cpu_name()}; {' '.join(cpu_isas())}; torch threads {torch.get_num_threads()}; load average "
          f"{os.getloadavg()[0]:.2f}; model {args.model}; one request at a time; median of {args.repeats} runs "
          "per turn")
    print("| turn | prompt tokens | reused | TTFT without (s) | TTFT with reuse (s) | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i, ((n, without, _), (_, with_, reused)) in enumerate(zip(rows[False], rows[True]), 1):
        print(f"| {i} | {n} | {reused} | {without:.3f} | {with_:.3f} | {without / with_:.1f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each turn; the median TTFT is shown")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
