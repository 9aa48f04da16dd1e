#!/usr/bin/env bash
# Everything llmkit does on a CUDA GPU, in one run of under ten minutes:
#   1. the CUDA tests (tests/test_cuda.py: bf16/fp16 autocast + grad scaler, torch.compile, flash SDPA,
#      pinned-memory batches, the serving engine, nccl DDP/FSDP when there are two GPUs),
#   2. GPT-2-124M training: llmkit's Trainer vs a nanoGPT-style loop (tokens/s, MFU),
#   3. inference: SmolLM2-135M generation, llmkit vs transformers (benchmarks/gpu_infer_speed.py).
# Usage, from the repository root:  bash benchmarks/gpu_check.sh [PYTHON]   (default .venv/bin/python)
# Prints the GPU, driver and library versions first; every step's output goes to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
status=0

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no nvidia-smi"; exit 1; }
"$PY" - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device (CPU-only wheel?)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
      f"{torch.cuda.get_device_name()}, bf16 {torch.cuda.is_bf16_supported()}")
PY

echo "== 1. CUDA tests"
timeout 300 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider -o addopts="" -ra || status=1

echo "== 2. GPT-2-124M training speed"
timeout 240 "$PY" benchmarks/gpu_train_speed.py --steps 20 || status=1

echo "== 3. inference speed"
timeout 150 "$PY" benchmarks/gpu_infer_speed.py --new-tokens 128 --batches 1,16 || status=1

echo "== done (status $status)"
exit $status
