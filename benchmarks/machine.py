"""What machine a benchmark ran on: the CPU's model name and the vector instruction sets that matter here.

Imported by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""
from __future__ import annotations

import platform
from pathlib import Path

ISAS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def _cpuinfo_field(key: str) -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), None)


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_isas(wanted=ISAS) -> list[str]:
    """Which of `wanted` this CPU's flags list, in that order."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in wanted if f in flags]
