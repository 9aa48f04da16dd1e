"""Shared test helpers: tiny models, synthetic data, the CLI in-process, servers on loopback.

Tests import the plain helpers with `from conftest import ...`; the fixtures here apply by name or
automatically (one_thread).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmkit.cli import main  # noqa: E402
from llmkit.data.corpus import prepare  # noqa: E402
from llmkit.io.checkpoint import save_checkpoint  # noqa: E402
from llmkit.io.common import split_llama_layer  # noqa: E402
from llmkit.io.encoders import save_encoder  # noqa: E402
from llmkit.io.hf import save_hf  # noqa: E402
from llmkit.model.config import ModelConfig, preset  # noqa: E402
from llmkit.model.decoder import GPT  # noqa: E402
from llmkit.model.encoder import Encoder, EncoderConfig  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402
from llmkit.train.trainer import TrainConfig  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file of ../shared/data; a test that needs one fails (never skips) with a clear message when it is missing."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: this test needs the shared data folder beside the checkout "
                    "(../shared/data, as CI lays it out)", pytrace=False)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the suite shares two cores between xdist workers
    (oversubscribed OpenMP threads spin-wait)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `llmkit ARGS...` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["llmkit", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def write_jsonl(path, rows):
    """One JSON object (or a raw string) per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- decoders: tiny models and a synthetic corpus for the trainer -------------------------------
def tiny_tokenizer() -> Tokenizer:
    texts = ["capital of zorbia is quibble", "and of yonder frobnitz", "be brief question answer",
             "the cat sat on the mat", "paris berlin rome blue green"] * 5
    return Tokenizer.train_bpe(texts, 320)


def tiny_decoder(vocab_size: int, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=48)
    return GPT(preset("llama-tiny", **{**cfg, **overrides}))


def tiny_model_dir(path, tokenizer=None, seed: int = 0, **overrides):
    tokenizer = tokenizer or tiny_tokenizer()
    return save_checkpoint(path, tiny_decoder(tokenizer.vocab_size, seed, **overrides), tokenizer)


WORDS = ("the king shall speak of crowns and roses while the queen walks in gardens of stone "
         "to be or not to be that is the question whether tis nobler in the mind").split()


def make_corpus(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_data_dir(root: Path) -> Path:
    corpus = make_corpus(root / "corpus.txt")
    text = corpus.read_text(encoding="utf-8")
    prepare([corpus], root / "data", Tokenizer.train_char([text]), val_fraction=0.1)
    return root / "data"


def trained_tiny_model(root: Path, steps: int = 3, **overrides) -> tuple[Path, Path]:
    """(data dir, model dir) of a tiny model trained for `steps` steps under `root`."""
    from llmkit.train.trainer import Trainer

    data = make_data_dir(root)
    Trainer(tiny_config(data, root / "model", max_steps=steps, **overrides)).fit()
    return data, root / "model"


def tiny_config(data_dir, out_dir, model=None, **overrides) -> TrainConfig:
    """A model small enough that a training step takes milliseconds."""
    base = dict(data_dir=str(data_dir), out_dir=str(out_dir), preset="char-tiny",
                model={"n_layer": 2, "n_head": 2, "n_embd": 32, **(model or {})},
                batch_size=4, block_size=16, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                lr_decay_steps=6, eval_interval=3, eval_iters=2, log_interval=1, ckpt_interval=0,
                progress=False, peak_flops=1e11)
    base.update(overrides)
    return TrainConfig(**base)


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


# ---- encoders: synthetic intent / slot data and tiny encoder directories ------------------------
CITIES = ["paris", "london", "tokyo", "berlin", "madrid", "rome", "oslo", "lima", "cairo", "delhi"]
SONGS = ["yellow", "hello", "imagine", "thriller", "vogue", "halo", "believer", "roar"]
TIMES = ["six", "seven", "eight", "nine", "ten", "noon", "midnight"]
FOODS = ["pizza", "sushi", "tacos", "noodles", "curry", "salad"]
# intent -> templates; {city}, {song}, {time}, {food} are slots (tagged B-/I- in the tagging data)
INTENTS = {
    "weather": ["what is the weather in {city}", "will it rain in {city} today", "how cold is it in {city}",
                "tell me the forecast for {city}", "is it sunny in {city}"],
    "flight": ["book a flight to {city}", "i need a plane ticket to {city}", "find flights from {city} to {city}",
               "fly me to {city} tomorrow", "are there cheap flights to {city}"],
    "music": ["play {song}", "put on {song} please", "i want to hear {song}", "start the song {song}",
              "play some {song} for me"],
    "alarm": ["wake me up at {time}", "set an alarm for {time}", "alarm at {time} please",
              "remind me at {time} to get up", "i need to be up by {time}"],
    "food": ["order {food} for dinner", "i am hungry get me {food}", "deliver {food} to my house",
             "can you order some {food}", "i would like {food} tonight"],
}
SLOTS = {"city": CITIES, "song": SONGS, "time": TIMES, "food": FOODS}


def _fill(template: str, rng: random.Random) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for piece in template.split():
        if piece.startswith("{"):
            kind = piece.strip("{}")
            value = rng.choice(SLOTS[kind]).split()
            words += value
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(value) - 1)
        else:
            words.append(piece)
            tags.append("O")
    return words, tags


def intent_data(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        intent = rng.choice(sorted(INTENTS))
        words, _ = _fill(rng.choice(INTENTS[intent]), rng)
        out.append({"text": " ".join(words), "label": intent})
    return out


def slot_data(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = _fill(rng.choice([t for ts in INTENTS.values() for t in ts]), rng)
        out.append({"tokens": words, "tags": tags})
    return out


def tiny_encoder_dir(path: Path, texts: list[str], seed: int = 0, **config) -> Path:
    """A randomly initialised 2-layer encoder with a byte-level BPE tokenizer trained on `texts`."""
    tokenizer = Tokenizer.train_bpe(texts, vocab_size=400)
    torch.manual_seed(seed)
    cfg = dict(vocab_size=tokenizer.vocab_size, max_position=64, n_layer=2, n_head=2, n_embd=64,
               dropout=0.0, pad_token_id=tokenizer.pad_id)
    model = Encoder(EncoderConfig(**{**cfg, **config}))
    save_encoder(path, model, tokenizer)
    return path


# ---- serving: a tiny model directory and servers on loopback ports --------------------------------
SERVE_WORDS = ("the king queen speaks of love and war in a garden where roses grow under a pale moon while "
         "soldiers march home through rain to find their hearts older than the stone walls").split()


def serve_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(SERVE_WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
            for _ in range(lines)]


def make_tiny_model(out_dir: Path, block_size: int = 256, seed: int = 0) -> Path:
    """A randomly initialised Llama-style decoder with a byte-level BPE tokenizer, saved as an llmkit dir."""
    tokenizer = Tokenizer.train_bpe(serve_corpus(), vocab_size=384)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2,
                         n_embd=64, bias=False, norm="rmsnorm", mlp="swiglu", pos="rope",
                         tie_embeddings=False, init_std=0.1)
    return save_checkpoint(out_dir, GPT(config).eval(), tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_thread(app):
    """Run an ASGI app under uvicorn in this process; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def server_process(*args: str, startup_timeout: float = 120.0, env: dict | None = None):
    """`llmkit serve ARGS` in a subprocess on a free loopback port; yield its base URL."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "llmkit.cli", "serve", "--port", str(port), *args]
    # the server's log goes to a file, not a pipe: nobody drains a pipe while the test runs, and a
    # full pipe (64 KiB of access-log lines under load) would block the server mid-write
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"llmkit serve exited with {proc.returncode}:\n{log.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llmkit serve did not come up in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ---- deliberately broken inputs for the bad-input tests: model dirs with bad configs, crafted GGUF
# headers, HF shard indexes that point outside their directory, weights that are all NaN
FOX_TEXT = "the quick brown fox jumps over the lazy dog. to be or not to be, that is the question. "
FOX_LLAMA = dict(block_size=64, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, bias=False, norm="rmsnorm",
             mlp="swiglu", pos="rope", tie_embeddings=True)


def fox_tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe([FOX_TEXT] * 4, vocab_size=280)


def fox_model(tok: Tokenizer, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, **FOX_LLAMA)).eval()


def edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of model dir `src` whose config.json went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit(meta)))
    return dst


def nan_model_dir(tok: Tokenizer, path: Path) -> Path:
    model = fox_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    return save_checkpoint(path, model, tok)


def add_gguf_value(writer, key: str, value) -> None:
    """One metadata entry, its GGUF type picked by the Python type (int: uint32)."""
    if isinstance(value, list):
        writer.add_array(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, value)


def write_gguf(path: Path, model: GPT, tok: Tokenizer, meta: dict | None = None) -> Path:
    """`model` as a llama GGUF (q/k rows left in llmkit's order: these files test parsing, not numbers).
    `meta` overrides or adds metadata; a value's Python type picks its GGUF type."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    keys = {"llama.context_length": c.block_size, "llama.embedding_length": c.n_embd,
            "llama.block_count": c.n_layer, "llama.feed_forward_length": c.intermediate_size,
            "llama.attention.head_count": c.n_head, "llama.attention.head_count_kv": c.n_kv_head,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 10000.0, **(meta or {})}
    for key, value in keys.items():
        add_gguf_value(w, key, value)
    spec = json.loads(tok.hf.to_str())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([tok.id_to_token(i) for i in range(tok.vocab_size)])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_eos_token_id(tok.eos_id)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["embed.weight"], "output_norm.weight": state["final_norm.weight"]}
    for i in range(c.n_layer):
        parts = split_llama_layer(state, i, c)
        names = {"norm1": "attn_norm", "norm2": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
                 "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
        tensors.update({f"blk.{i}.{names[k]}.weight": v for k, v in parts.items()})
    for name, tensor in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(tensor.numpy(), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_dir_with_index(model: GPT, tok: Tokenizer, path: Path, weight_map) -> Path:
    """A Hugging Face export whose weights are described by a shard index holding `weight_map`."""
    save_hf(model, tok, path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def warm_kernels() -> None:
    """Build the CPU decoding kernels now if they are not cached: the first build announces itself on
    stderr, which must not land inside a case that checks stderr is one error line."""
    from llmkit.infer import kernels

    kernels.available()


def workspace(tmp_path_factory, name: str) -> tuple[Path, Tokenizer, GPT]:
    """A fresh folder, the kernels built, and the tiny tokenizer and model the files are made from."""
    root = tmp_path_factory.mktemp(name)
    warm_kernels()
    tok = fox_tokenizer()
    return root, tok, fox_model(tok)


def tree(root: Path) -> set[str]:
    """Every path under `root` (files and folders), to show a failed command left nothing behind."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# ---- the application tests: one small joint intent-slots model, trained once per process
ROOT = Path(__file__).resolve().parents[1]
BOOKING_TRAIN = ROOT / "examples" / "data" / "booking_train.jsonl"
BOOKING_TEST = ROOT / "examples" / "data" / "booking_test.jsonl"
BOOKING_DOMAIN = ROOT / "examples" / "booking_domain.yaml"
JOINT_EPOCHS = 6


def booking_texts() -> list[str]:
    return [json.loads(line)["text"] for line in BOOKING_TRAIN.read_text().splitlines()]


@functools.lru_cache(maxsize=None)
def joint_model() -> tuple[Path, dict]:
    """(dir, test-set metrics) of a 2-layer encoder from scratch with intent and slot heads, trained jointly
    on the example booking data (a few seconds on one core)."""
    root = Path(tempfile.mkdtemp(prefix="llmkit-joint-"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    from llmkit.train.multitask import finetune_intent_slots
    from llmkit.train.tasks import FinetuneConfig

    try:
        base = tiny_encoder_dir(root / "base", booking_texts())
        metrics = finetune_intent_slots(str(base), BOOKING_TRAIN, root / "joint", val_path=BOOKING_TEST,
                                        config=FinetuneConfig(epochs=JOINT_EPOCHS, lr=3e-3, batch_size=16),
                                        log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return root / "joint", metrics
