"""CPU kernels for batch-1 decoding (kernels.cpp), compiled on first use and cached on disk.

    from llmkit.infer import kernels
    if kernels.available():
        y = kernels.matvec(x, weight, bias)              # one row: weight @ x + bias
        o = kernels.decode_attention(q, k, v)            # one query per row over the cached keys
        h = kernels.rms_norm(x, weight, eps)             # llmkit's RMSNorm in one op

Decoding one token reads every weight once, so its speed is how fast the matrix-vector products
stream the weights from memory, plus the cost of many tiny ops on single rows; kernels.cpp says what
each kernel gains over PyTorch's own. The modules llmkit.infer.cpu swaps into a model at load time
call them through the `*_applies` checks (CPU, no autograd, supported dtypes and layouts; a few rows
for matvec, one query per row for decode_attention); training runs the plain modules and never sees them. The build needs a C++ compiler (`$CXX`, else c++/g++) and an x86-64 CPU
with AVX2 and FMA; it takes ~15 s once, then the library is reused from ~/.cache/llmkit (or
$LLMKIT_CACHE), after checking it against the SHA-256 recorded when it was built (a changed file
is rebuilt) and that no other user can write to that folder. Where it cannot be built,
`available()` is False and callers keep PyTorch's kernels: nothing else changes.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from llmkit.utils import atomic_path

SOURCE = Path(__file__).with_name("kernels.cpp")
INCLUDES = (Path(__file__).with_name("decode_ops.inc"),)  # shared with quant_kernels.cpp
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-std=c++20"]
_state: dict = {}  # "loaded": bool, once the first call has settled it


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "c++", "g++") if c and shutil.which(c)), None)


def _build_command(compiler: str, output: Path, source: Path = SOURCE, flags=FLAGS) -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch.compiled_with_cxx11_abi())
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    return [compiler, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(source), "-o", str(output),
            *libs, "-lc10", "-ltorch_cpu"]


def _library_path(compiler: str, source: Path = SOURCE, flags=FLAGS, includes=()) -> Path:
    """The built library, named by a hash of everything that goes into it (`includes`: files the source includes)."""
    key = hashlib.sha256(source.read_bytes())
    for path in includes:
        key.update(path.read_bytes())
    key.update(" ".join(_build_command(compiler, Path("out"), source, flags)).encode())
    key.update(torch.__version__.encode())
    cache = Path(os.environ.get("LLMKIT_CACHE") or Path.home() / ".cache" / "llmkit")
    return cache / "kernels" / f"llmkit_{source.stem}_{key.hexdigest()[:16]}.so"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_cache_dir(folder: Path) -> None:
    """The cache holds code this process will run: refuse one that others can write to."""
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{folder} is writable by other users or not owned by this one")


def _build(compiler: str, source: Path = SOURCE, flags=FLAGS, includes=()) -> Path:
    """The library's path, built if missing or if it no longer matches the hash recorded at build time."""
    path = _library_path(compiler, source, flags, includes)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_cache_dir(path.parent)
    stamp = path.with_suffix(".sha256")
    # One process builds while the others (pytest workers, a server's threads) wait for its result.
    # O_NOFOLLOW: a lock planted as a symlink must not make us create or truncate another file.
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        intact = (path.is_file() and not path.is_symlink() and stamp.is_file()
                  and stamp.read_text().strip() == _digest(path))
        if not intact:
            print("llmkit: building the CPU decoding kernels (once, about 15 s)...", file=sys.stderr, flush=True)
            with atomic_path(path) as partial:
                result = subprocess.run(_build_command(compiler, partial, source, flags), capture_output=True,
                                        text=True)
                if result.returncode != 0:
                    raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed")
                digest = _digest(partial)
            with atomic_path(stamp) as tmp:
                tmp.write_text(digest + "\n")
    return path


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""
    @torch.library.register_fake("llmkit::matvec")
    def _(x, weight, bias):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("llmkit::decode_attention")
    def _(q, k, v, last_slot):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmkit::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)


def available() -> bool:
    """Whether the kernels are loaded, building them on the first call if need be."""
    if "loaded" not in _state:
        _state["loaded"] = False
        if os.environ.get("LLMKIT_KERNELS", "1") == "0":  # to compare with PyTorch's own kernels
            return False
        compiler = _compiler()
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or compiler is None:
            return False
        try:
            torch.ops.load_library(str(_build(compiler, includes=INCLUDES)))
            _register_fakes()
            _state["loaded"] = True
        except (OSError, RuntimeError) as err:
            warnings.warn(f"llmkit's CPU decoding kernels could not be built ({err}); using PyTorch's")
    return _state["loaded"]


DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Up to this many rows (beam search's beams, a server's few sequences) read each weight once in
# `matvec`; more rows are a GEMM, where PyTorch's blocked kernels reuse the weights better.
MATVEC_ROWS = 4


def matvec_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T is an inference product of at most MATVEC_ROWS rows that `matvec` computes."""
    return (x.device.type == "cpu" and x.numel() <= MATVEC_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and x.dtype == weight.dtype and x.dtype in DTYPES and weight.is_contiguous() and available())


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x holding a few rows; fp32 accumulation, x's dtype out. Each
    row's result is what it would be alone (the same sums in the same order)."""
    return torch.ops.llmkit.matvec(x, weight, bias)


def decode_attention_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether attention of q over k is the one-query-per-row CPU inference case `decode_attention` runs."""
    return (q.device.type == "cpu" and q.shape[2] == 1 and q.dtype == k.dtype == torch.float32
            and q.shape[-1] % 8 == 0 and k.stride(3) == 1 and not torch.is_grad_enabled() and available())


def decode_attention(q, k, v, last_slot: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA for one query per row: q (B, H, 1, D), k/v (B, K, S, D) float32 (K divides H), attending
    to key slots 0..S-1, or 0..last_slot (a one-element int64 tensor) of a preallocated cache."""
    return torch.ops.llmkit.decode_attention(q, k, v, last_slot)


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether RMSNorm of x is an inference call on the CPU that `rms_norm` computes."""
    return (x.device.type == "cpu" and not torch.is_grad_enabled() and x.dtype == weight.dtype
            and x.dtype in DTYPES and x.is_contiguous() and available())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """llmkit.model.layers.RMSNorm's forward (HF Llama's roundings) in one pass over each row. Its
    eight small PyTorch ops cost ~100 us per call at batch 1, as much as a 576 x 1536 matvec."""
    return torch.ops.llmkit.rms_norm(x, weight, eps)
