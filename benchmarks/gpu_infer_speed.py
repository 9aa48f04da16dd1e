"""Inference on one CUDA GPU: SmolLM2-135M-Instruct, llmkit vs transformers on the same weights.

    python benchmarks/gpu_infer_speed.py [--new-tokens 128] [--batches 1,16]

Greedy decoding of --new-tokens after a 128-token prompt, bf16, batch 1 and a batch of prompts:
llmkit.generate vs transformers' model.generate (the HF export of the same GGUF weights, SDPA
attention, its default cache). Reported: decode tokens/s summed over the batch (median of 3 runs).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmkit.infer.generate import generate  # noqa: E402
from llmkit.io.resolve import convert, resolve_model  # noqa: E402

PROMPT = "The for statement in Python iterates over the items of any sequence, in the order they appear. " * 8


def timed(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs + 1):  # the first run warms up kernels and caches
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    import transformers

    model, tok = resolve_model("smollm2-135m-instruct", device="cuda", dtype="bf16")
    ids = tok.encode(PROMPT)[:128]
    prompt = tok.decode(ids)
    with tempfile.TemporaryDirectory() as tmp:
        convert("smollm2-135m-instruct", Path(tmp) / "hf", to="hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.bfloat16).cuda().eval()
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"SmolLM2-135M bf16, 128-token prompt, {args.new_tokens} new tokens, greedy")
    print("| batch | llmkit tok/s | transformers tok/s |\n|---:|---:|---:|")
    for batch in map(int, args.batches.split(",")):
        made = []

        def ours():  # may stop early at EOS: count the tokens it really produced
            made[:] = generate(model, tok, [prompt] * batch, max_new_tokens=args.new_tokens, temperature=0)

        x = torch.tensor([ids] * batch, device="cuda")

        def theirs():
            hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens, do_sample=False)

        ours_s = timed(ours)
        n_ours = sum(len(tok.encode(text)) for text in made)  # re-encoded: within a token or two per row
        print(f"| {batch} | {n_ours / ours_s:,.0f} | {batch * args.new_tokens / timed(theirs):,.0f} |")


if __name__ == "__main__":
    main()
