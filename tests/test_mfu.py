"""MFU is model FLOPs over the measured peak: the FLOPs SFT reports per step must be the FLOPs it
really runs (counted by torch's FlopCounterMode), so MFU cannot pass 100% by overcounting."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_decoder, tiny_model_dir, tiny_tokenizer, write_jsonl
from llmkit.model.lora import LoRAConfig, apply_lora
from llmkit.train.sft import _head_on, sft_flops


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sft_flops_are_the_flops_a_step_runs(lora, tied):
    model = tiny_decoder(320, tie_embeddings=tied)
    if lora:
        apply_lora(model, LoRAConfig(rank=4))
    x = torch.randint(0, 320, (3, 24))
    y = torch.full_like(x, -100)
    y[:, 16:] = x[:, 16:]  # a third of the positions are assistant targets
    keep = y != -100
    with FlopCounterMode(display=False) as counter:
        with _head_on(model.lm_head, keep):
            logits, _ = model(x)
        F.cross_entropy(logits.float(), y[keep]).backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    weights = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)  # products with weight matrices
    cfg = model.config
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * x.shape[1] * x.numel()  # scores and values
    # The attention kernel may or may not report its FLOPs to the counter (SDPA does, a fused CPU path
    # does not); when it does, they must be the 12 * L * H * D * T per token counted here.
    assert counter.get_total_flops() - weights in (0, attention), counts
    assert sft_flops(model, x, y) == weights + attention  # every matmul of the step, and nothing else


def test_sft_mfu_stays_below_100_percent(tmp_path):
    from llmkit.train.sft import SFTTrainer
    from llmkit.train.config import TrainConfig

    tok = tiny_tokenizer()
    base = tiny_model_dir(tmp_path / "base", tok)
    rows = [{"messages": [{"role": "user", "content": f"capital of zorbia {i}?"},
                          {"role": "assistant", "content": "quibble"}]} for i in range(16)]
    chats = write_jsonl(tmp_path / "chats.jsonl", rows)
    cfg = TrainConfig(data_dir=str(chats), out_dir=str(tmp_path / "out"), block_size=48, batch_size=4, max_steps=3,
                      eval_interval=0, ckpt_interval=0, log_interval=1, progress=False, threads=1)
    SFTTrainer(cfg, model=str(base), lora=LoRAConfig(rank=4), log=lambda *_: None).fit()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in records if "mfu" in r]
    assert mfus and all(0 < m < 1 for m in mfus), mfus
