"""Distillation vs training from scratch: the same small student, the same steps, on tinyshakespeare.

1. a character-level teacher (4 layers, 128 wide) is trained on tinyshakespeare,
2. a student (2 layers, 64 wide) is trained for --student-steps with plain cross-entropy,
3. the same student, same seed and batches, is trained for the same steps with the
   distillation loss (soft teacher targets mixed with the labels),
and both students' validation cross-entropy (the same fixed validation windows) is printed.

    python benchmarks/distill.py [--teacher-steps 600] [--student-steps 300] [--top-k K]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="text file (default: ../shared/data/tinyshakespeare.txt)")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--top-k", type=int, default=None, help="precomputed top-k teacher logits instead of live")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not Path(args.data).is_file():
        print(f"no data file {args.data}", file=sys.stderr)
        return 1

    import torch

    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.data.corpus import prepare
    from llmkit.train.distill import DistillTrainer
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.trainer import Trainer, TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    text = Path(args.data).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        prepare([args.data], work / "data", Tokenizer.train_char([text]), val_fraction=0.1)

        def config(out, steps, model, lr):
            return TrainConfig(data_dir=str(work / "data"), out_dir=str(work / out), preset="char-tiny",
                               model=model, block_size=64, batch_size=32, max_steps=steps, lr=lr, min_lr=lr / 10,
                               warmup_steps=steps // 20, lr_decay_steps=steps, eval_interval=0, eval_iters=50,
                               log_interval=50, ckpt_interval=0, progress=False, seed=1, threads=args.threads)

        rows = []
        started = time.perf_counter()
        teacher = Trainer(config("teacher", args.teacher_steps, {"n_layer": 4, "n_embd": 128}, 2e-3)).fit()
        rows.append(("teacher (4x128)", args.teacher_steps, teacher["val_loss"], time.perf_counter() - started))
        student = {"n_layer": 2, "n_head": 4, "n_embd": 64}

        started = time.perf_counter()
        scratch = Trainer(config("scratch", args.student_steps, student, 3e-3)).fit()
        rows.append(("student from scratch", args.student_steps, scratch["val_loss"], time.perf_counter() - started))

        model, tok = load_checkpoint(work / "teacher")
        started = time.perf_counter()
        distilled = DistillTrainer(config("distilled", args.student_steps, student, 3e-3), model, tok,
                                   temperature=args.temperature, alpha=args.alpha, top_k=args.top_k).fit()
        rows.append((f"student distilled (T={args.temperature}, alpha={args.alpha}"
                     + (f", top-{args.top_k})" if args.top_k else ")"),
                     args.student_steps, distilled["val_loss"], time.perf_counter() - started))

    print(f"\ntinyshakespeare, char-level, block 64, batch 32, {torch.get_num_threads()} threads, CPU")
    print(f"{'model':<44} {'steps':>6} {'val loss':>9} {'time s':>7}")
    for name, steps, loss, seconds in rows:
        print(f"{name:<44} {steps:>6} {loss:>9.4f} {seconds:>7.1f}")
    gain = scratch["val_loss"] - distilled["val_loss"]
    print(f"distillation {'lowers' if gain > 0 else 'does not lower'} the student's validation loss by {gain:.4f}")
    return 0 if gain > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
