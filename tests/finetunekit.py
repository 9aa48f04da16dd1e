"""Shared helpers for the fine-tuning, distillation, evaluation and plotting tests."""
import json

import pytest
import torch

from llmkit.checkpoint import save_checkpoint
from llmkit.config import preset
from llmkit.model.decoder import GPT
from llmkit.tokenizer import Tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and the suite shares two cores between xdist workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
