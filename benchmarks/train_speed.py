"""Training speed on character-level tinyshakespeare: llmkit's Trainer vs a plain nanoGPT-style loop.

    .venv/bin/python benchmarks/train_speed.py [--rows small|large|all] [--iters N] [--baseline-iters N]

Rows (nanoGPT's shakespeare-char recipe, dropout 0, AdamW betas (0.9, 0.99), wd 0.1, clip 1.0):
  small  4 layers x 4 heads x 128, block 64, batch 12, 2000 iters, warmup 100, cosine to 1e-4 at 2000
  large  6 layers x 6 heads x 384, block 256, batch 16, 50 iters (timing; warmup 100, decay at 5000)
Each row runs twice in this process on the same model, data and schedule:
  baseline  the straightforward loop: eager model, for-loop AdamW (nanoGPT's CPU default), a Python
            list of slices per batch, loss.item() every step
  llmkit    llmkit.train.Trainer: torch.compile (compile time excluded from ms/iter, reported),
            fused AdamW, vectorised sampling, host syncs only at log points
and is compared with nanoGPT's documented CPU numbers for this machine class. Validation loss is
the mean over 20 fixed val batches for both runs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmkit.config import preset  # noqa: E402
from llmkit.data import RandomWindowSampler, load_split, prepare  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.optim import lr_at, param_groups  # noqa: E402
from llmkit.perf import measure_peak_flops  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402
from llmkit.train import VAL_SEED, TrainConfig, Trainer  # noqa: E402

ROWS = {
    "small": dict(model=dict(n_layer=4, n_head=4, n_embd=128), block_size=64, batch_size=12, iters=2000,
                  warmup=100, decay=2000, ref_ms=(36.0, 48.0), ref_val=1.886, target=1.3),
    "large": dict(model=dict(n_layer=6, n_head=6, n_embd=384), block_size=256, batch_size=16, iters=50,
                  warmup=100, decay=5000, ref_ms=(1700.0, 1770.0), ref_val=None, target=1.8),
}
LR, MIN_LR, BETAS, WEIGHT_DECAY, CLIP, EVAL_ITERS, SEED = 1e-3, 1e-4, (0.9, 0.99), 0.1, 1.0, 20, 1337


def model_config(row: dict, vocab_size: int):
    return preset("char-tiny", vocab_size=vocab_size, block_size=row["block_size"], dropout=0.0, **row["model"])


def val_loss(model, val_tokens, row: dict, autocast) -> float:
    """Mean loss over the same EVAL_ITERS val batches the Trainer uses."""
    sampler = RandomWindowSampler(val_tokens, row["block_size"], row["batch_size"], VAL_SEED)
    model.eval()
    with torch.no_grad(), autocast:
        losses = [model(*sampler.next_batch())[1].float().item() for _ in range(EVAL_ITERS)]
    model.train()
    return sum(losses) / len(losses)


def run_baseline(row: dict, data_dir: Path, vocab_size: int, iters: int) -> dict:
    """The plain training loop most people write first (nanoGPT's train.py on CPU, compile off)."""
    torch.manual_seed(SEED)
    model = GPT(model_config(row, vocab_size))
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS)  # CPU default: for-loop
    train, val = load_split(data_dir, "train"), load_split(data_dir, "val")
    T, B = row["block_size"], row["batch_size"]

    def get_batch():
        ix = torch.randint(len(train) - T, (B,))
        x = torch.stack([torch.from_numpy(train[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(train[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    times, loss_value = [], float("nan")
    for it in range(iters):
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it, LR, MIN_LR, row["warmup"], row["decay"])
        x, y = get_batch()
        _, loss = model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        times.append(time.perf_counter() - start)
    steady = times[min(5, len(times) - 1):]  # the first steps allocate and warm caches
    result = {"ms_per_iter": 1000 * sum(steady) / len(steady), "train_loss": loss_value, "iters": iters}
    if iters == row["iters"]:
        result["val_loss"] = val_loss(model, val, row, torch.autocast("cpu", enabled=False))
    result["flops_per_token"] = model.flops_per_token(T)
    return result


def run_llmkit(row: dict, data_dir: Path, out_dir: Path, dtype: str, compile_model: bool,
               iters: int, threads: int | None) -> dict:
    log_every = max(1, min(50, iters // 5))
    config = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), preset="char-tiny", model=dict(row["model"]),
                         batch_size=row["batch_size"], block_size=row["block_size"], max_steps=iters, lr=LR,
                         min_lr=MIN_LR, warmup_steps=row["warmup"], lr_decay_steps=row["decay"],
                         weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1], grad_clip=CLIP, dtype=dtype,
                         device="cpu", compile=compile_model, eval_interval=0, eval_iters=EVAL_ITERS,
                         log_interval=log_every, ckpt_interval=0, seed=SEED, progress=False, threads=threads)
    trainer = Trainer(config)
    metrics = trainer.fit()
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "ms_per_step" in r]
    # The first log window holds compilation and warm-up; later windows are steady state.
    steady = windows[1:] or windows
    steps = [r["step"] - p["step"] for p, r in zip(windows, windows[1:])] or [windows[0]["step"]]
    ms = sum(r["ms_per_step"] * n for r, n in zip(steady, steps)) / sum(steps)
    first_window_s = windows[0]["ms_per_step"] * windows[0]["step"] / 1000
    return {"ms_per_iter": ms, "train_loss": metrics["loss"], "val_loss": metrics.get("val_loss"),
            "compile_s": max(0.0, first_window_s - ms * windows[0]["step"] / 1000), "iters": iters,
            "flops_per_token": trainer.flops_per_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/tinyshakespeare.txt"))
    parser.add_argument("--rows", choices=["small", "large", "all"], default="all")
    parser.add_argument("--iters", type=int, default=None, help="override every row's iteration count")
    parser.add_argument("--baseline-iters", type=int, default=None,
                        help="baseline iterations (default: the row's; fewer gives timing only)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if not Path(args.data).is_file():
        sys.exit(f"error: {args.data} not found (pass --data PATH to tinyshakespeare.txt)")
    if args.threads:
        torch.set_num_threads(args.threads)

    peak32 = measure_peak_flops("cpu", torch.float32, seconds=1.0)
    peak16 = measure_peak_flops("cpu", torch.bfloat16, seconds=1.0)
    dtype = "bfloat16" if peak16 > peak32 else "float32"
    peak = max(peak32, peak16)
    print(f"threads {torch.get_num_threads()}, matmul peak fp32 {peak32 / 1e9:.1f} GFLOP/s, "
          f"bf16 {peak16 / 1e9:.1f} GFLOP/s -> training dtype {dtype}", flush=True)

    rows = ["small", "large"] if args.rows == "all" else [args.rows]
    results = {"peak_fp32": peak32, "peak_bf16": peak16, "dtype": dtype, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="llmkit-bench-") as tmp:
        tmp = Path(tmp)
        text = Path(args.data).read_text(encoding="utf-8")
        meta = prepare([args.data], tmp / "data", Tokenizer.train_char([text]))
        vocab = meta["vocab_size"]
        for name in rows:
            row = dict(ROWS[name])
            if args.iters:
                row["iters"] = args.iters
            print(f"\n[{name}] {row['model']} block {row['block_size']} batch {row['batch_size']}, "
                  f"{row['iters']} iters, vocab {vocab}", flush=True)
            res = {}
            if not args.no_baseline:
                res["baseline"] = run_baseline(row, tmp / "data", vocab, args.baseline_iters or row["iters"])
                print(f"  baseline: {res['baseline']['ms_per_iter']:.1f} ms/iter", flush=True)
            res["llmkit"] = run_llmkit(row, tmp / "data", tmp / f"run-{name}", dtype, not args.no_compile,
                                       row["iters"], args.threads)
            print(f"  llmkit:   {res['llmkit']['ms_per_iter']:.1f} ms/iter "
                  f"(compile/warm-up {res['llmkit']['compile_s']:.1f} s)", flush=True)
            results[name] = {**res, "row": row}
            print_table(name, row, res, peak32, peak, dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(name: str, row: dict, res: dict, peak32: float, peak: float, dtype: str) -> None:
    tokens = row["batch_size"] * row["block_size"]
    ref_ms = sum(row["ref_ms"]) / 2
    ref_tps = tokens * 1000 / ref_ms
    print(f"\n{name}: reference nanoGPT CPU fp32 {row['ref_ms'][0]:g}-{row['ref_ms'][1]:g} ms/iter "
          f"({tokens * 1000 / row['ref_ms'][1]:,.0f}-{tokens * 1000 / row['ref_ms'][0]:,.0f} tokens/s)"
          + (f", val loss {row['ref_val']}" if row["ref_val"] else ""))
    print(f"{'run':<10}{'dtype':<10}{'ms/iter':>10}{'tokens/s':>11}{'MFU':>8}{'val loss':>10}"
          f"{'x baseline':>12}{'x reference':>13}")
    base_ms = res["baseline"]["ms_per_iter"] if "baseline" in res else None
    for run, r in res.items():
        tps = tokens * 1000 / r["ms_per_iter"]
        run_peak = peak if run == "llmkit" else peak32
        mfu = r["flops_per_token"] * tps / run_peak
        val = f"{r['val_loss']:.3f}" if r.get("val_loss") is not None else "-"
        vs_base = f"{base_ms / r['ms_per_iter']:.2f}x" if base_ms else "-"
        print(f"{run:<10}{dtype if run == 'llmkit' else 'float32':<10}{r['ms_per_iter']:>10.1f}{tps:>11,.0f}"
              f"{100 * mfu:>7.1f}%{val:>10}{vs_base:>12}{tps / ref_tps:>12.2f}x")
    r = res["llmkit"]
    ratio = tokens * 1000 / r["ms_per_iter"] / ref_tps
    loss_ok = row["ref_val"] is None or (r["val_loss"] is not None and r["val_loss"] <= row["ref_val"])
    verdict = "met" if ratio >= row["target"] and loss_ok else "NOT met"
    print(f"target >= {row['target']}x reference tokens/s"
          + (f" with val loss <= {row['ref_val']}" if row["ref_val"] else "") + f": {verdict} "
          f"({ratio:.2f}x" + (f", val {r['val_loss']:.3f}" if r.get("val_loss") is not None else "") + ")")
    if not math.isfinite(r["train_loss"]):
        print("warning: training loss is not finite")


if __name__ == "__main__":
    main()
