"""Property tests: random option values to the commands and random corruptions of model files
(llmkit checkpoints, tokenizer.json, safetensors, GGUF) to the loaders. Whatever the input, the
result is a clean run or an LlmkitError (one line from the CLI), never another exception.

Corruptions keep files at most their length (truncation, flipped bytes, overwritten spans): a
corruption that grows a size field must then be caught by a check against the file's tensors."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import workspace, write_gguf
from llmkit.io.checkpoint import save_checkpoint
from llmkit.cli import main
from llmkit.errors import LlmkitError
from llmkit.io.hf import save_hf

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root, tok, model = workspace(tmp_path_factory, "prop")
    text = root / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 3)
    return {"llmkit": save_checkpoint(root / "llmkit", model, tok), "hf": save_hf(model, tok, root / "hf"),
            "gguf": write_gguf(root / "tiny.gguf", model, tok), "text": text}


# (which artifact, which of its files) the corruptions are applied to
TARGETS = [("llmkit", "config.json"), ("llmkit", "model.safetensors"), ("llmkit", "tokenizer.json"),
           ("hf", "config.json"), ("hf", "model.safetensors"), ("hf", "tokenizer_config.json"), ("gguf", None)]


@st.composite
def corruptions(draw):
    """(kind, a, b, payload) with positions as fractions of the file length."""
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite"]))
    a = draw(st.floats(0, 1))
    b = draw(st.floats(0, 1))
    payload = draw(st.binary(min_size=1, max_size=16))
    return kind, a, b, payload


def corrupt(path: Path, kind: str, a: float, b: float, payload: bytes) -> None:
    data = bytearray(path.read_bytes())
    n = len(data)
    if kind == "truncate":
        del data[int(a * n):]
    elif kind == "flip":  # XOR a few bytes from `a` on, so each really changes
        for i, byte in enumerate(payload[:8]):
            pos = int(a * (n - 1) + i * b * 37) % n
            data[pos] ^= byte or 0xFF
    else:
        start = int(a * n)
        data[start:start + len(payload)] = payload[:max(0, n - start)]
    path.write_bytes(bytes(data))


def load(kind: str, path: Path):
    from llmkit.io.resolve import resolve_model
    from llmkit.tokenizer import Tokenizer

    resolve_model(path)
    if kind == "llmkit":
        Tokenizer.load(path / "tokenizer.json")


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"{t[0]}:{t[1] or 'file'}")
@settings(max_examples=25, **SETTINGS)
@given(corruption=corruptions())
def test_corrupt_files_load_or_fail_with_llmkit_error(target, corruption, artifacts):
    kind, name = target
    with tempfile.TemporaryDirectory() as tmp:
        src = artifacts[kind]
        copy = Path(tmp) / src.name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy)
        corrupt(copy / name if name else copy, *corruption)
        try:
            load(kind, copy)
        except LlmkitError:
            pass


NUMBERS = st.one_of(st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["", "abc", "1e400", "0x10", "-0", "1_000"]))
GENERATE_OPTIONS = ["--temperature", "--top-k", "--top-p", "--repetition-penalty", "--max-new-tokens", "--seed",
                    "--num-samples"]
EVAL_OPTIONS = ["--batch-size", "--stride", "--max-tokens"]
SERVE_OPTIONS = ["--port", "--max-batch", "--max-queue", "--context", "--timeout", "--max-body"]


def run(argv, capsys) -> None:
    """main(argv) must end in a clean exit, or one `error:` line and a non-zero status."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if exit_info.value.code:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err


@settings(max_examples=40, **SETTINGS)
@given(options=st.dictionaries(st.sampled_from(GENERATE_OPTIONS), NUMBERS, min_size=1, max_size=3))
def test_random_generate_options(options, artifacts, capsys):
    argv = ["generate", "the fox", "--model", artifacts["llmkit"], "--no-echo"]
    for name, value in options.items():
        value = min(value, 4) if name == "--num-samples" and isinstance(value, int) else value
        argv += [f"{name}={value}"]  # '=' keeps values like '-5' from being read as options
    run(argv, capsys)


@settings(max_examples=30, **SETTINGS)
@given(options=st.dictionaries(st.sampled_from(EVAL_OPTIONS), NUMBERS, min_size=1, max_size=3))
def test_random_eval_options(options, artifacts, capsys):
    run(["eval", "--model", artifacts["llmkit"], "--text", artifacts["text"],
         *[f"{k}={v}" for k, v in options.items()]], capsys)


@settings(max_examples=30, **SETTINGS)
@given(options=st.dictionaries(st.sampled_from(SERVE_OPTIONS), NUMBERS, min_size=1, max_size=4))
def test_random_serve_options(options, capsys):
    # --model names nothing, so even valid values end before a server starts
    run(["serve", "--model", "no-such-model", *[f"{k}={v}" for k, v in options.items()]], capsys)


@settings(max_examples=60, **SETTINGS)
@given(key=st.sampled_from(["lr", "min_lr", "beta1", "beta2", "threads", "batch_size", "max_steps", "dtype",
                            "device", "warmup_steps", "grad_clip", "compile", "model.n_head", "model.n_layer",
                            "model.dropout", "model.n_kv_head", "model.norm", "model.block_size", "preset"]),
       value=st.one_of(NUMBERS.map(str), st.text(max_size=8)))
def test_random_training_settings(key, value):
    from llmkit.model.config import PRESETS, ModelConfig
    from llmkit.train.config import load_train_config

    try:
        config = load_train_config(None, [f"{key}={value}"])
        if config.preset in PRESETS:
            ModelConfig(**{**PRESETS[config.preset], **config.model})
    except LlmkitError:
        pass
