"""Throughput accounting: measured matmul peak and model FLOPs utilisation (MFU).

MFU = (model FLOPs per token x tokens per second) / peak FLOP/s. Vendor peaks
are meaningless on a shared CPU, so the peak is what a large matmul of the
training dtype actually reaches on this device, measured once per process.
"""
from __future__ import annotations

import time

import torch

_PEAKS: dict[tuple[str, torch.dtype], float] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       seconds: float = 0.3) -> float:
    """Best-of-several FLOP/s of an n x n matmul in `dtype` on `device` (cached per process)."""
    device = torch.device(device)
    key = (str(device), dtype)
    if key in _PEAKS:
        return _PEAKS[key]
    if device.type == "cuda":
        n = 8192
    else:
        # Slow CPU dtypes (bf16 without AMX) would take seconds per 1024^3 product.
        n = 1024 if dtype == torch.float32 else 256
    gen = torch.Generator(device="cpu").manual_seed(0)  # leave the global RNG untouched
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    a @ b  # warm-up: first call may pick kernels or allocate workspaces
    _sync(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    _PEAKS[key] = 2 * n**3 / best
    if device.type == "cpu" and dtype != torch.float32:
        # Autocast runs part of each step in float32, and the small matrix a slow CPU dtype is timed
        # on understates its peak: never report a peak below float32's, or MFU can pass 100%.
        _PEAKS[key] = max(_PEAKS[key], measure_peak_flops(device, torch.float32, seconds))
    return _PEAKS[key]


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0
