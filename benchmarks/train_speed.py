"""Training speed on character-level tinyshakespeare: llmkit's Trainer vs a plain nanoGPT-style loop.

    .venv/bin/python benchmarks/train_speed.py [--rows small|large|all] [--iters N] [--baseline-iters N]

Rows (nanoGPT's shakespeare-char recipe, dropout 0, AdamW betas (0.9, 0.99), wd 0.1, clip 1.0):
  small  4 layers x 4 heads x 128, block 64, batch 12, 2000 iters, warmup 100, cosine to 1e-4 at 2000
  large  6 layers x 6 heads x 384, block 256, batch 16, 50 iters (timing; warmup 100, decay at 5000)
Each row trains two models in this process from the same init, data and schedule:
  baseline  the straightforward loop: eager model with SDPA attention, for-loop AdamW (nanoGPT's CPU
            default), a Python list of slices per batch, loss.item() every step
  llmkit    llmkit.train.trainer.Trainer.train_step: torch.compile (the first step, which compiles, is timed
            apart and reported), fused AdamW, vectorised sampling, no host sync per step (the same
            plain model and SDPA attention: speed-ups are the loop's, not the model's)
in alternating chunks of 50 iterations, so both see the same machine load (the machine is shared),
and both are compared with nanoGPT's documented CPU numbers for this machine class. Validation
loss is the mean over the same 20 fixed val batches for both.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmkit.model.config import preset  # noqa: E402
from llmkit.data.corpus import RandomWindowSampler, load_split, prepare  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.train.optim import lr_at, param_groups  # noqa: E402
from llmkit.train.perf import measure_peak_flops  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402
from llmkit.train.trainer import VAL_SEED, TrainConfig, Trainer  # noqa: E402

ROWS = {
    "small": dict(model=dict(n_layer=4, n_head=4, n_embd=128), block_size=64, batch_size=12, iters=2000,
                  warmup=100, decay=2000, ref_ms=(36.0, 48.0), ref_val=1.886, target=1.3),
    "large": dict(model=dict(n_layer=6, n_head=6, n_embd=384), block_size=256, batch_size=16, iters=50,
                  warmup=100, decay=5000, ref_ms=(1700.0, 1770.0), ref_val=None, target=1.8),
}
LR, MIN_LR, BETAS, WEIGHT_DECAY, CLIP, EVAL_ITERS, SEED = 1e-3, 1e-4, (0.9, 0.99), 0.1, 1.0, 20, 1337


def model_config(row: dict, vocab_size: int):
    return preset("char-tiny", vocab_size=vocab_size, block_size=row["block_size"], dropout=0.0, **row["model"])


def val_loss(model, val_tokens, row: dict) -> float:
    """Mean loss over the same EVAL_ITERS val batches the Trainer uses (VAL_SEED)."""
    sampler = RandomWindowSampler(val_tokens, row["block_size"], row["batch_size"], VAL_SEED)
    model.eval()
    with torch.no_grad():
        losses = [model(*sampler.next_batch())[1].item() for _ in range(EVAL_ITERS)]
    model.train()
    return sum(losses) / len(losses)


class Baseline:
    """The plain training loop most people write first (nanoGPT's train.py on CPU, compile off)."""

    def __init__(self, row: dict, data_dir: Path, vocab_size: int):
        torch.manual_seed(SEED)
        self.row = row
        self.model = GPT(model_config(row, vocab_size))
        # no fused/foreach flag: on CPU tensors AdamW then runs its per-parameter for-loop
        self.optimizer = torch.optim.AdamW(param_groups(self.model, WEIGHT_DECAY), lr=LR, betas=BETAS)
        self.train, self.val = load_split(data_dir, "train"), load_split(data_dir, "val")
        self.it = 0
        self.loss = float("nan")

    def get_batch(self):
        T, B, data = self.row["block_size"], self.row["batch_size"], self.train
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def step(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.it, LR, MIN_LR, self.row["warmup"], self.row["decay"])
        x, y = self.get_batch()
        _, loss = self.model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = loss.item()  # nanoGPT's CPU run logs every iteration
        self.it += 1

    def val_loss(self) -> float:
        return val_loss(self.model, self.val, self.row)


def pick_threads(row: dict, vocab_size: int) -> tuple[int, dict]:
    """torch.set_num_threads to the fastest of 1..cpu_count for this row's eager step.

    On a shared machine oversubscribed OpenMP threads can make each op many times slower, so
    the thread count is measured rather than assumed; both loops then run with it.
    """
    torch.manual_seed(0)
    model = GPT(model_config(row, vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab_size, (row["batch_size"], row["block_size"]))
    steps = 10 if row["block_size"] * row["model"]["n_embd"] < 20000 else 1
    timings = {}
    for threads in range(1, (os.cpu_count() or 1) + 1):
        torch.set_num_threads(threads)
        samples = []
        for rep in range(4):  # the first repetition warms up and is dropped
            start = time.perf_counter()
            for _ in range(steps):
                model(x, targets=x)[1].backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            samples.append((time.perf_counter() - start) / steps)
        timings[threads] = 1000 * sorted(samples[1:])[1]
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best, timings


def make_trainer(row: dict, data_dir: Path, out_dir: Path, dtype: str, compile_model: bool,
                 threads: int | None) -> Trainer:
    config = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), preset="char-tiny",
                         model={**row["model"], "dropout": 0.0}, batch_size=row["batch_size"],
                         block_size=row["block_size"], max_steps=row["iters"], lr=LR, min_lr=MIN_LR,
                         warmup_steps=row["warmup"], lr_decay_steps=row["decay"], weight_decay=WEIGHT_DECAY,
                         beta1=BETAS[0], beta2=BETAS[1], grad_clip=CLIP, dtype=dtype, device="cpu",
                         compile=compile_model, eval_iters=EVAL_ITERS, seed=SEED, progress=False, threads=threads)
    return Trainer(config)


def run_row(row: dict, data_dir: Path, out_dir: Path, vocab: int, dtype: str, compile_model: bool,
            threads: int | None, baseline_iters: int, chunk: int = 50) -> dict:
    """Run both loops in alternating chunks so that both see the same machine load."""
    trainer = make_trainer(row, data_dir, out_dir, dtype, compile_model, threads)
    trainer.model.train()
    start = time.perf_counter()
    trainer.train_step()  # the first step pays torch.compile; timed on its own
    first_step_s = time.perf_counter() - start
    baseline = Baseline(row, data_dir, vocab) if baseline_iters else None
    times = {"llmkit": [0.0, 0], "baseline": [0.0, 0]}
    while trainer.step < row["iters"] or (baseline and baseline.it < baseline_iters):
        if baseline and baseline.it < baseline_iters:
            n = min(chunk, baseline_iters - baseline.it)
            start = time.perf_counter()
            for _ in range(n):
                baseline.step()
            times["baseline"][0] += time.perf_counter() - start
            times["baseline"][1] += n
        if trainer.step < row["iters"]:
            n = min(chunk, row["iters"] - trainer.step)
            start = time.perf_counter()
            for _ in range(n):
                loss = trainer.train_step()
            times["llmkit"][0] += time.perf_counter() - start
            times["llmkit"][1] += n
            trainer_loss = loss.item()
    steady_ms = 1000 * times["llmkit"][0] / max(1, times["llmkit"][1])
    result = {"llmkit": {"ms_per_iter": steady_ms, "train_loss": trainer_loss, "val_loss": trainer.evaluate(),
                         "compile_s": max(0.0, first_step_s - steady_ms / 1000),
                         "flops_per_token": trainer.flops_per_token}}
    trainer.close()
    if baseline:
        result["baseline"] = {"ms_per_iter": 1000 * times["baseline"][0] / times["baseline"][1],
                              "train_loss": baseline.loss, "flops_per_token": trainer.flops_per_token,
                              "val_loss": baseline.val_loss() if baseline_iters == row["iters"] else None}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/tinyshakespeare.txt"))
    parser.add_argument("--rows", choices=["small", "large", "all"], default="all")
    parser.add_argument("--iters", type=int, default=None, help="override every row's iteration count")
    parser.add_argument("--baseline-iters", type=int, default=None,
                        help="baseline iterations (default: the row's; fewer gives timing only)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: the fastest count, measured per row)")
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
    print(f"load average at start {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
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
            if args.threads is None:
                threads, probe = pick_threads(row, vocab)
                print("  threads probe (ms/step, eager): " + ", ".join(f"{t}: {ms:.0f}" for t, ms in probe.items())
                      + f" -> {threads} threads", flush=True)
            res = run_row(row, tmp / "data", tmp / f"run-{name}", vocab, dtype, not args.no_compile, args.threads,
                          0 if args.no_baseline else (args.baseline_iters or row["iters"]))
            print(f"  first llmkit step (torch.compile) {res['llmkit']['compile_s']:.1f} s", flush=True)
            results[name] = {**res, "row": row, "threads": torch.get_num_threads()}
            print_table(name, row, res, peak32, peak, dtype)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
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
    for run, r in sorted(res.items()):  # baseline first
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
