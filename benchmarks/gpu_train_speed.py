"""GPT-2-124M training speed on one CUDA GPU: llmkit's Trainer step vs a plain nanoGPT-style loop.

    python benchmarks/gpu_train_speed.py [--steps 30] [--batch 12] [--block 1024]

Both train the same llmkit GPT (preset gpt2-124m: 12 layers x 12 heads x 768, vocab 50257) from the
same initial weights on the same random token windows, bf16 autocast, fused AdamW, clip 1.0:
  nanogpt-loop  what nanoGPT's train.py does per iteration: torch.compile'd model, x/y sliced from a
                memory-mapped token array and copied with pin_memory/non_blocking, forward, backward,
                clip, step, zero_grad, loss.item() at every step
  llmkit        llmkit.train.Trainer.train_step (compile=true, dtype=bfloat16) on a prepared data dir
Reported: ms/step, tokens/s and MFU (6N+attention FLOPs per token, llmkit.perf) against the peak
this GPU measures for a bf16 matmul and against the nominal dense bf16 peak given by --peak-tflops.
Random tokens: speed does not depend on the data, and nothing has to be downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmkit.model.config import preset  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.optim import build_adamw  # noqa: E402
from llmkit.perf import measure_peak_flops, mfu  # noqa: E402

VOCAB = 50257


def random_data_dir(root: Path, n_tokens: int) -> Path:
    """A prepared-data directory (train.bin, val.bin, meta.json, tokenizer.json) of random GPT-2 ids."""
    from llmkit.tokenizer import Tokenizer

    rng = np.random.default_rng(0)
    for split, n in (("train", n_tokens), ("val", n_tokens // 10)):
        rng.integers(0, VOCAB, n, dtype=np.uint16).tofile(root / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": VOCAB, "eos_id": 0, "train_tokens": n_tokens,
            "val_tokens": n_tokens // 10, "documents": 1}
    (root / "meta.json").write_text(json.dumps(meta))
    Tokenizer.train_char(["abc"]).save(root / "tokenizer.json")  # required by the Trainer, unused here
    return root


def nanogpt_loop(model, data: np.ndarray, batch: int, block: int, steps: int) -> float:
    """Seconds per step of the plain loop (after 3 warm-up steps, which include compilation)."""
    opt = build_adamw(model, 6e-4, 0.1, (0.9, 0.95), "cuda")
    cmodel = torch.compile(model)
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        ix = np.random.randint(0, len(data) - block - 1, batch)
        x = torch.from_numpy(np.stack([data[j:j + block] for j in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[j + 1:j + 1 + block] for j in ix]).astype(np.int64))
        x, y = x.pin_memory().cuda(non_blocking=True), y.pin_memory().cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = cmodel(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT syncs for its log line
        if i >= 3:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def llmkit_loop(data_dir: Path, out: Path, batch: int, block: int, steps: int, init: dict) -> float:
    from llmkit.train.trainer import Trainer, load_train_config

    config = load_train_config(None, [f"data_dir={data_dir}", f"out_dir={out}", "preset=gpt2-124m",
                                      f"block_size={block}", f"batch_size={batch}", "dtype=bfloat16",
                                      "device=cuda", "compile=true", "lr=6e-4", "beta2=0.95",
                                      "progress=false", "peak_flops=1e15", "overwrite=true"])
    trainer = Trainer(config)
    trainer.raw_model.load_state_dict(init)
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="nominal dense bf16 peak (H100/H200 SXM)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = GPT(preset("gpt2-124m", block_size=args.block)).cuda()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    flops = model.flops_per_token(args.block)
    tokens = args.batch * args.block
    measured = measure_peak_flops(torch.device("cuda"), torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = random_data_dir(Path(tmp), 20 * tokens)
        data = np.memmap(data_dir / "train.bin", dtype=np.uint16, mode="r")
        rows = {"nanogpt-loop": nanogpt_loop(model, data, args.batch, args.block, args.steps)}
        del model
        torch.cuda.empty_cache()
        rows["llmkit"] = llmkit_loop(data_dir, Path(tmp) / "run", args.batch, args.block, args.steps, init)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; GPT-2-124M, batch {args.batch} x "
          f"{args.block} tokens, bf16 autocast, compiled; measured bf16 matmul peak {measured / 1e12:.0f} TFLOP/s")
    print("| loop | ms/step | tokens/s | MFU (measured peak) | MFU (nominal peak) |\n|---|---:|---:|---:|---:|")
    for name, sec in rows.items():
        tps = tokens / sec
        print(f"| {name} | {1000 * sec:.1f} | {tps:,.0f} | {100 * mfu(flops, tps, measured):.1f}% | "
              f"{100 * mfu(flops, tps, args.peak_tflops * 1e12):.1f}% |")


if __name__ == "__main__":
    main()
