"""Per-token cost of grammar-constrained decoding on the CPU, for the three candidate libraries,
with SmolLM2-135M-Instruct's tokenizer (49,152 tokens) and a JSON schema: what a server pays on top of
each decode step for `response_format: json_schema`. Prints compile time, the first mask
(lazy tables) apart, then median, mean and p99 per-token time (mask + apply to logits + advance), and one batch-1 decode step of the model for scale.

    python benchmarks/structured_overhead.py [--tokens 200]

Needs llguidance, xgrammar (pip install --no-deps xgrammar apache-tvm-ffi: its GPU extras are not
needed on the CPU) and outlines-core; a library that is missing is skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from machine import cpu_isas, cpu_name  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "pet": {"enum": ["cat", "dog", "none"]},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "pet", "address"], "additionalProperties": False}


def run(name, start, mask_and_advance, vocab, steps, seed=0):
    """Drive one matcher with random logits; time each step's mask + apply + advance."""
    t0 = time.perf_counter()
    state = start()
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(seed)
    times, tokens = [], []
    for _ in range(steps):
        logits = torch.randn(vocab, generator=gen)
        t = time.perf_counter()
        token, done = mask_and_advance(state, logits)
        times.append(time.perf_counter() - t)
        tokens.append(token)
        if done:
            break
    rest = sorted(times[1:])  # the first mask also builds the library's lazy tables: reported apart
    return {"library": name, "compile_s": compile_s, "tokens": len(times), "first_ms": 1e3 * times[0],
            "median_ms": 1e3 * statistics.median(rest), "mean_ms": 1e3 * statistics.mean(rest),
            "p99_ms": 1e3 * rest[int(0.99 * (len(rest) - 1))]}, tokens


def llguidance_case(hf_fast, vocab):
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    tokenizer = llguidance.hf.from_tokenizer(hf_fast, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    mask = lt.allocate_token_bitmask(1, vocab)

    def start():
        return llguidance.LLMatcher(tokenizer, grammar)

    def step(matcher, logits):
        lt.fill_next_token_bitmask(matcher, mask, 0)
        lt.apply_token_bitmask_inplace(logits[None], mask)
        token = int(logits.argmax())
        matcher.consume_token(token)
        return token, matcher.is_stopped() or matcher.is_accepting() and token == tokenizer.eos_token
    return start, step


def xgrammar_case(hf_fast, vocab):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf_fast, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    mask = xgr.allocate_token_bitmask(1, vocab)

    def start():
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(SCHEMA)))

    def step(matcher, logits):
        matcher.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits[None], mask)
        token = int(logits.argmax())
        matcher.accept_token(token)
        return token, matcher.is_terminated()
    return start, step


def outlines_case(hf_fast, vocab, eos):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    # outlines-core matches token *strings*: byte-level pieces as the tokenizer spells them
    pieces: dict[str, list[int]] = {}
    for piece, i in hf_fast.get_vocab().items():
        if i != eos and i < vocab:
            pieces.setdefault(piece, []).append(i)
    vocabulary = Vocabulary(eos, pieces)
    regex = build_regex_from_schema(json.dumps(SCHEMA))

    def start():
        return Guide(Index(regex, vocabulary))

    def step(guide, logits):
        allowed = torch.tensor(guide.get_tokens())
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        token = int(masked.argmax())
        guide.advance(token)
        return token, guide.is_finished()
    return start, step




def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import PreTrainedTokenizerFast

    from llmkit.io.resolve import resolve_model

    model, tok = resolve_model("smollm2-135m-instruct")
    vocab = model.config.vocab_size
    hf_fast = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=tok.eos_token)
    isa = " ".join(cpu_isas(("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile")))
    print(f"CPU: {cpu_name()} ({isa}), 1 thread; vocabulary {vocab}")
    with torch.inference_mode():
        ids = torch.tensor([tok.encode("Hello")])
        model(ids)
        t = time.perf_counter()
        for _ in range(5):
            model(ids, last_only=True)
        step_ms = (time.perf_counter() - t) / 5 * 1e3
    print(f"model step (batch 1, {ids.shape[1]} tokens, no cache) for scale: {step_ms:.1f} ms")
    cases = {"llguidance": lambda: llguidance_case(hf_fast, vocab),
             "xgrammar": lambda: xgrammar_case(hf_fast, vocab),
             "outlines-core": lambda: outlines_case(hf_fast, vocab, tok.eos_id)}
    print(f"{'library':<14} {'compile s':>10} {'first ms':>9} {'tokens':>7} {'median ms':>10} {'mean ms':>8} "
          f"{'p99 ms':>8}")
    for name, make in cases.items():
        try:
            start, step = make()
        except ImportError as e:
            print(f"{name:<14} skipped: {e}")
            continue
        row, tokens = run(name, start, step, vocab, args.tokens)
        print(f"{name:<14} {row['compile_s']:>10.3f} {row['first_ms']:>9.1f} {row['tokens']:>7} {row['median_ms']:>10.3f} "
              f"{row['mean_ms']:>8.3f} {row['p99_ms']:>8.3f}")
        print(f"{'':<14} sample: {tok.decode(tokens)[:100]!r}")


if __name__ == "__main__":
    main()
