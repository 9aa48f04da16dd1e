"""Fine-tuning speed: tokens/s and peak memory of LoRA SFT vs full fine-tuning of SmolLM2-135M.

Every configuration runs in its own process on the same packed SFT batches (sequence length
512, loss on assistant tokens only): llmkit's SFTTrainer step with LoRA and without, and, when
installed, `peft` LoRA and plain full fine-tuning on `transformers`' LlamaForCausalLM holding the
same weights (exported with `llmkit convert --to hf`). Same optimizer (AdamW), same gradient
clipping, same LoRA settings (rank 8, alpha 16, every linear layer of the blocks).

Each engine lives in its own process; the parent steps them in turn (one warm-up step each,
then --steps timed rounds), so a machine whose load changes treats them alike. Peak memory is
each process's resident-set high-water mark over the timed steps (reset through
/proc/self/clear_refs after the warm-up), so it counts weights, activations, gradients and
optimizer state but not the one-off cost of loading the checkpoint.

    python benchmarks/finetune_speed.py [--steps 3] [--batch-size 1] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ = 512
RANK, ALPHA = 8, 16


def synthetic_chats(n: int = 300) -> list[dict]:
    import random

    rng = random.Random(0)
    words = "the a model token data train loss answer question JSON shape memory speed layer".split()
    chats = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(8, 40)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(10, 60)))
        chats.append({"messages": [{"role": "user", "content": f"{i}: {q}?"}, {"role": "assistant", "content": a}]})
    return chats


def peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size (Linux >= 4.0)


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batches(tokenizer, chats_file: Path, batch_size: int, n: int):
    from llmkit.data.chats import SFTSampler, load_sft_data

    data = load_sft_data(chats_file, tokenizer, SEQ + 1)
    sampler = SFTSampler(data, SEQ, batch_size, seed=0, pack_rows=True, pad_id=tokenizer.eos_id or 0)
    return [sampler.next_batch() for _ in range(n)]


def serve_steps(step, data) -> None:
    """Child loop: one training step per "step" line on stdin, answered with its seconds on stdout.
    The parent alternates between engines step by step, so they share the machine's load alike.
    The first step is a warm-up; the memory high-water mark is reset after it."""
    import gc

    for i, line in enumerate(sys.stdin):
        if line.strip() != "step":
            break
        x, y = data[i % len(data)]
        start = time.perf_counter()
        step(x, y)
        print(json.dumps({"seconds": time.perf_counter() - start, "tokens": x.numel(), "peak_mib": peak_mib()}),
              flush=True)
        if i == 0:
            gc.collect()
            peak_reset()


def child_llmkit(hf_dir: Path, chats: Path, lora: bool, batch_size: int, steps: int) -> None:
    from llmkit.model.lora import LoRAConfig
    from llmkit.train.sft import SFTTrainer
    from llmkit.train.config import TrainConfig

    config = TrainConfig(data_dir=str(chats), out_dir=tempfile.mkdtemp(), block_size=SEQ, batch_size=batch_size,
                         max_steps=10_000, lr=1e-4, progress=False, peak_flops=1e12)
    trainer = SFTTrainer(config, model=str(hf_dir), lora=LoRAConfig(RANK, ALPHA) if lora else None, pack=True,
                         val_fraction=0.0, log=lambda *_: None)
    data = batches(trainer.tokenizer, chats, batch_size, steps + 1)
    trainer.train_sampler = iter_sampler(data)  # the very batches the other engines get
    trainer.raw_model.train()
    trainable, total = trainer.trainable
    print(json.dumps({"trainable": trainable, "total": total}), flush=True)
    serve_steps(lambda x, y: trainer.train_step(), data)


class iter_sampler:
    """Hands out a fixed list of (x, y) batches in order, in the sampler interface the trainer uses."""

    def __init__(self, data):
        self.data, self.i = data, 0

    def next_batch(self):
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        return x, y


def child_hf(hf_dir: Path, chats: Path, lora: bool, batch_size: int, steps: int) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llmkit.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    data = batches(Tokenizer.load(hf_dir), chats, batch_size, steps + 1)

    def step(x, y):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    total = sum(p.numel() for p in model.parameters())
    print(json.dumps({"trainable": sum(p.numel() for p in params), "total": total}), flush=True)
    serve_steps(step, data)


ENGINES = {
    "llmkit LoRA": ("llmkit", True), "llmkit full": ("llmkit", False),
    "peft+transformers LoRA": ("hf", True), "transformers full": ("hf", False),
}


def measure_interleaved(names: list[str], work: Path, args) -> list[tuple[str, dict]]:
    """Start one child per engine, then step them in turn: warm-up, then args.steps timed rounds."""
    children = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--dir", str(work), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        children[name] = (proc, json.loads(proc.stdout.readline()))
    timings = {name: [] for name in names}
    for _ in range(args.steps + 1):
        for name, (proc, _) in children.items():
            proc.stdin.write("step\n")
            proc.stdin.flush()
            timings[name].append(json.loads(proc.stdout.readline()))
    rows = []
    for name, (proc, info) in children.items():
        proc.stdin.close()
        proc.wait()
        timed = timings[name][1:]
        rows.append((name, {**info, "tokens_per_s": sum(t["tokens"] for t in timed) / sum(t["seconds"] for t in timed),
                            "peak_mib": timed[-1]["peak_mib"]}))
        print(f"done: {name}", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in every configuration")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        engine, lora = ENGINES[args.child]
        run = child_llmkit if engine == "llmkit" else child_hf
        work = Path(args.dir)
        run(work / "hf", work / "chats.jsonl", lora, args.batch_size, args.steps)
        return 0

    from llmkit.io.resolve import convert

    names = ["llmkit LoRA", "llmkit full"]
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        names += ["peft+transformers LoRA", "transformers full"]
    except ImportError:
        print("peft/transformers not installed: measuring llmkit only", file=sys.stderr)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        convert(args.model, work / "hf", to="hf")
        (work / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in synthetic_chats()))
        rows = []
        # all engines alive at once (about 12 GB together), stepped in turn
        rows = measure_interleaved(names, work, args)
    import torch

    print(f"\nSmolLM2-135M SFT, sequence length {SEQ}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{args.threads or torch.get_num_threads()} threads, float32, CPU")
    print(f"{'configuration':<24} {'tokens/s':>9} {'peak MiB':>9} {'trainable params':>17} {'of total':>9}")
    for name, r in rows:
        print(f"{name:<24} {r['tokens_per_s']:>9.1f} {r['peak_mib']:>9.0f} {r['trainable']:>17,} "
              f"{100 * r['trainable'] / r['total']:>8.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
