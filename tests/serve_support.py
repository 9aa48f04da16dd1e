"""Helpers for the serving tests: a tiny model directory and servers on loopback ports."""
from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from llmkit.checkpoint import save_checkpoint
from llmkit.config import ModelConfig
from llmkit.model.decoder import GPT
from llmkit.tokenizer import Tokenizer

WORDS = ("the king queen speaks of love and war in a garden where roses grow under a pale moon while "
         "soldiers march home through rain to find their hearts older than the stone walls").split()


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
            for _ in range(lines)]


def make_tiny_model(out_dir: Path, block_size: int = 256, seed: int = 0) -> Path:
    """A randomly initialised Llama-style decoder with a byte-level BPE tokenizer, saved as an llmkit dir."""
    tokenizer = Tokenizer.train_bpe(corpus(), vocab_size=384)
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
