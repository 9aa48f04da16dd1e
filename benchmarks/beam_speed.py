"""Beam search speed: SmolLM2-135M-Instruct (fp32), 4 beams vs greedy, llmkit vs transformers.

    .venv/bin/python benchmarks/beam_speed.py [--new-tokens 32] [--prompts 4] [--threads 1]

Both engines load the same float weights (the embedded GGUF, dequantized, written once as a Hugging
Face directory). For each chat prompt every engine generates up to --new-tokens tokens; a forward
hook counts the model calls, so "ms/token" is the time of the whole call (prefill included) divided
by the decoding steps it took. Times are CPU seconds of this process: with --threads 1 that is what
an idle core gives even on a busy machine (wall seconds are printed beside them).
Rows: llmkit greedy (`generate(temperature=0)`), llmkit 4 beams (`generate(num_beams=4)`, the beams
batched, the KV cache reordered per step), transformers greedy and 4 beams (`model.generate`).
llmkit's model runs as `llmkit generate` runs it: with the CPU routes `optimize_for_inference` swaps in
at load time (its matrix-vector kernel reads each weight once for all four beams). The last line
counts the prompts whose 4-beam text is the same in both engines.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
from machine import cpu_isas, cpu_name  # noqa: E402

PROMPTS = ["Write a short story about a robot who learns to paint.", "Explain step by step how photosynthesis works.",
           "Give me three tips for better sleep and explain each.", "Describe the history of the bicycle."]


def timed(model, fn) -> tuple[float, float, int, str]:
    """(CPU s, wall s, model calls, result) of fn()."""
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        return time.process_time() - c, time.perf_counter() - w, calls[0], out
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

    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.infer.generate import generate
    from llmkit.io.hf import save_hf
    from llmkit.io.resolve import resolve_model

    ours, tok = resolve_model("smollm2-135m-instruct", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tok, tmp)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    optimize_for_inference(ours, single_row=True)  # what `llmkit generate` does after loading
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
    results, texts = {}, {}
    for name, (model, fn) in engines.items():
        cpu_s = wall_s = steps = 0
        for p in prompts:
            c, w, calls, out = timed(model, lambda: fn(p))
            cpu_s, wall_s, steps = cpu_s + c, wall_s + w, steps + max(1, calls - 1)
            texts.setdefault(name, []).append(out.strip())
        results[name] = (1000 * cpu_s / steps, 1000 * wall_s / steps, steps)
    print(f"CPU: {cpu_name()} ({', '.join(cpu_isas()) or 'no AVX'}), torch threads {torch.get_num_threads()}; "
          f"SmolLM2-135M-Instruct fp32, {len(prompts)} chat prompts, up to {n} new tokens")
    print(f"{'engine':22} {'CPU ms/token':>13} {'wall ms/token':>14} {'steps':>6} {'vs llmkit greedy':>17}")
    base = results["llmkit greedy"][0]
    for name, (c, w, steps) in results.items():
        print(f"{name:22} {c:13.1f} {w:14.1f} {steps:6d} {c / base:16.2f}x")
    print(f"4 beams vs greedy: llmkit {results['llmkit 4 beams'][0] / base:.2f}x; llmkit 4 beams vs transformers "
          f"4 beams: {results['transformers 4 beams'][0] / results['llmkit 4 beams'][0]:.2f}x faster")
    same = sum(a == b for a, b in zip(texts["llmkit 4 beams"], texts["transformers 4 beams"]))
    print(f"4-beam texts identical in both engines: {same} of {len(prompts)} prompts")


def hf(model, tok, prompt: str, n: int, beams: int) -> str:
    ids = torch.tensor([tok.encode(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, num_beams=beams,
                             do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in tok.stop_ids]
    return tok.decode(new)


if __name__ == "__main__":
    main()
