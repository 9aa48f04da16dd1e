"""Beam search speed: SmolLM2-135M-Instruct (fp32), 4 beams vs greedy, llmkit vs transformers.

    .venv/bin/python benchmarks/beam_speed.py [--new-tokens 32] [--prompts 4] [--threads 1]

Both engines load the same float weights (the embedded GGUF, dequantized, written once as a Hugging
Face directory). For each chat prompt every engine generates up to --new-tokens tokens; a forward
hook counts the model calls, so "ms/token" is the time of the whole call (prefill included) divided
by the decoding steps it took. Times are CPU seconds of this process: with --threads 1 that is what
an idle core gives even on a busy machine (wall seconds are printed beside them).
Rows: llmkit greedy (`generate(temperature=0)`), llmkit 4 beams (`generate(num_beams=4)`, the beams
batched, the KV cache reordered per step), transformers greedy and 4 beams (`model.generate`).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain step by step how photosynthesis works.",
           "Give me three tips for better sleep and explain each.", "Describe the history of the bicycle."]


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX'}), torch threads {torch.get_num_threads()}"


def timed(model, fn) -> tuple[float, float, int]:
    """(CPU s, wall s, model calls) of fn()."""
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        c, w = time.process_time(), time.perf_counter()
        fn()
        return time.process_time() - c, time.perf_counter() - w, calls[0]
    finally:
        hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    from llmkit.infer.generate import generate
    from llmkit.io.hf import save_hf
    from llmkit.io.resolve import resolve_model

    ours, tok = resolve_model("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tok, tmp)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    n = args.new_tokens
    engines = {
        "llmkit greedy": (ours, lambda p: generate(ours, tok, p, max_new_tokens=n, temperature=0)),
        "llmkit 4 beams": (ours, lambda p: generate(ours, tok, p, max_new_tokens=n, num_beams=4)),
        "transformers greedy": (ref, lambda p: hf(ref, tok, p, n, 1)),
        "transformers 4 beams": (ref, lambda p: hf(ref, tok, p, n, 4)),
    }
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in PROMPTS[:args.prompts]]
    for model, fn in engines.values():
        fn(prompts[0])  # warm-up (kernels built, allocator warm)
    results = {}
    for name, (model, fn) in engines.items():
        cpu_s = wall_s = steps = 0
        for p in prompts:
            c, w, calls = timed(model, lambda: fn(p))
            cpu_s, wall_s, steps = cpu_s + c, wall_s + w, steps + max(1, calls - 1)
        results[name] = (1000 * cpu_s / steps, 1000 * wall_s / steps, steps)
    print(f"CPU: {cpu()}; SmolLM2-135M-Instruct fp32, {len(prompts)} chat prompts, up to {n} new tokens")
    print(f"{'engine':22} {'CPU ms/token':>13} {'wall ms/token':>14} {'steps':>6} {'vs llmkit greedy':>17}")
    base = results["llmkit greedy"][0]
    for name, (c, w, steps) in results.items():
        print(f"{name:22} {c:13.1f} {w:14.1f} {steps:6d} {c / base:16.2f}x")
    print(f"4 beams vs greedy: llmkit {results['llmkit 4 beams'][0] / base:.2f}x; llmkit 4 beams vs transformers "
          f"4 beams: {results['transformers 4 beams'][0] / results['llmkit 4 beams'][0]:.2f}x faster")


def hf(model, tok, prompt: str, n: int, beams: int):
    ids = torch.tensor([tok.encode(prompt)])
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, num_beams=beams,
                              do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)


if __name__ == "__main__":
    main()
