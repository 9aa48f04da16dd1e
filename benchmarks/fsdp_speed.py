"""FSDP vs DDP on two CPU processes (gloo): step time on llama-tiny, and memory per rank for a model
whose optimizer state dominates.

    nice -n 10 .venv/bin/python benchmarks/fsdp_speed.py [--steps 20]

Each row launches `torchrun --nproc_per_node 2` running llmkit's Trainer.train_step (strategy=ddp or
strategy=fsdp, float32, fused AdamW) on random tokens, and reports per rank:
  ms/step     median over --steps steps after 3 warm-up steps, the slower rank
  state MB    parameters + gradients + AdamW moments this rank holds (FSDP: its shards)
  peak MB     peak resident memory of the process minus its resident memory before the model was built
              (in brackets: the peak reached by the end of set-up, when every rank still builds the whole
              model before sharding it)
  resident MB resident memory after the timed steps, minus the same baseline
Resident memory is what the OS charges, and it is not the same as live tensors: with strategy=fsdp llmkit
fixes glibc's mmap threshold (llmkit.train.distributed.return_freed_buffers_to_os), because by default
glibc keeps FSDP's per-block buffers, freed every step, resident in its heap (the `deep` row then peaked
as high as DDP: 1040 vs 1075 MB). Set MALLOC_MMAP_THRESHOLD_ to override the value for both strategies.
Rows:
  llama-tiny  the preset (4 layers x 256, vocab 4096), batch 8 x 128 tokens: compute-bound, the speed row
  deep        16 layers x 512, vocab 4096, batch 2 x 16 tokens: ~46M parameters, nearly all in blocks
              (FSDP gathers one block at a time), tiny activations: parameters, gradients and AdamW
              moments are nearly all the memory
Acceptance (issue 19): FSDP <= 1.3x DDP's step time on llama-tiny; lower memory per rank on `deep`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from machine import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "llama-tiny": dict(model={}, batch_size=8, block_size=128),
    "deep": dict(model={"n_layer": 16, "n_embd": 512, "n_head": 8, "n_kv_head": 2}, batch_size=2, block_size=16),
}


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(spec: str) -> None:
    """One torchrun rank: build the Trainer, time train_step, print one JSON line."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from llmkit.tokenizer import Tokenizer
    from llmkit.train.trainer import Trainer, load_train_config

    args = argparse.Namespace(**json.loads(spec))
    row = ROWS[args.row]
    data = Path(args.data)
    rank = int(os.environ["RANK"])
    if rank == 0 and not (data / "meta.json").exists():
        vocab = row["model"].get("vocab_size", 4096)
        np.random.default_rng(0).integers(0, vocab, 200_000, dtype=np.uint16).tofile(data / "train.bin")
        np.zeros(0, dtype=np.uint16).tofile(data / "val.bin")
        Tokenizer.train_char(["abc"]).save(data / "tokenizer.json")
        (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab, "eos_id": 0,
                                                    "train_tokens": 200_000, "val_tokens": 0}))
    while not (data / "meta.json").exists():
        time.sleep(0.1)
    base = rss_mb()
    overrides = [f"data_dir={data}", f"out_dir={data / args.strategy}", "preset=llama-tiny", "overwrite=true",
                 f"strategy={args.strategy}", f"batch_size={row['batch_size']}", f"block_size={row['block_size']}",
                 "progress=false", "peak_flops=1e11", "eval_interval=0", "threads=1"]
    overrides += [f"model.{k}={v}" for k, v in row["model"].items()]
    trainer = Trainer(load_train_config(None, overrides))
    init_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # building + sharding the model
    times = []
    for i in range(args.steps + 3):
        t = time.perf_counter()
        trainer.train_step()
        if i >= 3:
            times.append(time.perf_counter() - t)

    def local_bytes(t):
        return (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()

    param_bytes = sum(local_bytes(p) for p in trainer.raw_model.parameters())
    moments = sum(local_bytes(v) for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0)
    state = 2 * param_bytes + moments  # gradients are as large as the parameters a rank holds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"rank": rank, "ms": 1000 * float(np.median(times)), "state_mb": state / 2**20,
                                  "peak_mb": peak - base, "init_mb": init_peak - base,
                                  "steady_mb": rss_mb() - base}), flush=True)
    trainer.close()  # also leaves the process group it created


def launch(row: str, strategy: str, steps: int, data: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--worker",
           json.dumps({"row": row, "strategy": strategy, "steps": steps, "data": str(data)})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # both ranks print to one pipe: their lines may interleave, so pick the records out of the text
    results = [json.loads(m) for m in re.findall(r"RESULT (\{[^{}]*\})", proc.stdout)]
    if proc.returncode or len(results) != 2:
        raise SystemExit(f"{row}/{strategy} failed:\n{proc.stderr[-3000:]}")
    return results




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", default="llama-tiny,deep")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON: this process is one torchrun rank
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores visible, torch CPU capability {isa}); torch {torch.__version__}; "
          f"2 processes x 1 thread, gloo; median of {args.steps} steps")
    print("| row | strategy | ms/step | state MB/rank | peak MB/rank (peak by end of set-up) | "
          "resident MB/rank after the steps |\n|---|---|---:|---:|---:|---:|")
    for row in args.rows.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            measured = {}
            for strategy in ("ddp", "fsdp"):
                r = launch(row, strategy, args.steps, Path(tmp))
                measured[strategy] = max(x["ms"] for x in r)
                print(f"| {row} | {strategy} | {measured[strategy]:.1f} | {max(x['state_mb'] for x in r):.0f} | "
                      f"{max(x['peak_mb'] for x in r):.0f} ({max(x['init_mb'] for x in r):.0f}) | "
                      f"{max(x['steady_mb'] for x in r):.0f} |", flush=True)
            print(f"| {row} | fsdp / ddp | {measured['fsdp'] / measured['ddp']:.2f}x | | | |", flush=True)


if __name__ == "__main__":
    main()
