"""Supervised fine-tuning of a pretrained chat model: `SFTTrainer(config, model=..., lora=...)`.

The standard Trainer (accumulation, AMP, clipping, cosine LR, checkpoints, exact resume, DDP or FSDP)
with three things swapped: the model comes from `resolve_model` instead of a preset, batches
come from chat JSONL (`llmkit.data.chats`) instead of a token file, and with LoRA only the adapters
are trained and checkpointed.

out_dir after training:
  full fine-tuning  config.json + model.safetensors + tokenizer files + train_state.pt
  LoRA              adapter.safetensors + adapter_config.json + tokenizer files + train_state.pt,
                    and (merge=True, the default) the merged model's config.json + model.safetensors,
                    so out_dir loads like any model directory.
With strategy=fsdp the weights (full) or the adapters and their moments (LoRA) are also sharded in
`shards/` (llmkit.io.sharded), which resume reads at any number of processes.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.train import distributed
from llmkit.train import state as train_state
from llmkit.errors import LlmkitError
from llmkit.io import sharded, snapshots
from llmkit.model.lora import (LoRAConfig, apply_lora, count_parameters, load_adapter, load_adapter_weights,
                               merge_lora, read_adapter_config, save_adapter)
from llmkit.data.chats import SFTData, SFTSampler, describe, encode_chats, eval_batches, read_chats
from llmkit.train.trainer import Trainer


def split_data(data: SFTData, val_fraction: float, seed: int) -> tuple[SFTData, SFTData | None]:
    """Hold out a deterministic fraction of the conversations (at least one) for validation."""
    n_val = int(round(len(data) * val_fraction))
    if val_fraction <= 0 or n_val == 0 or n_val >= len(data):
        return data, None
    order = np.random.default_rng(seed).permutation(len(data))
    val_ids = set(order[:n_val].tolist())
    train = [e for i, e in enumerate(data.examples) if i not in val_ids]
    val = [e for i, e in enumerate(data.examples) if i in val_ids]
    return SFTData(train, data.stats), SFTData(val, {})


class SFTTrainer(Trainer):
    def __init__(self, config, model: str, lora: LoRAConfig | None = None, pack: bool = False,
                 val_data=None, val_fraction: float = 0.05, merge: bool = True, resume: bool = False, log=print):
        self.model_source, self.lora, self.pack, self.merge = str(model), lora, pack, merge
        self.val_path, self.val_fraction, self.log = val_data, val_fraction, log
        super().__init__(config, resume)
        trainable, total = count_parameters(self.raw_model)
        self.trainable = (trainable, total)
        if self.dist.is_main:
            self.log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    # ---- data and model ------------------------------------------------------------------------
    def _load_data(self) -> None:
        from llmkit.io.resolve import resolve_model

        cfg = self.config
        if not self.data_dir.is_file():
            raise LlmkitError(f"chat data {self.data_dir} is not a file (expected JSONL with \"messages\")")
        # Check the data before spending time on the model: a bad line fails in a moment.
        chats = read_chats(self.data_dir)
        val_chats = read_chats(self.val_path) if self.val_path is not None else None
        self.base_model, self.tokenizer = resolve_model(self.model_source, dtype="float32")  # trained: floats
        if cfg.block_size > self.base_model.config.block_size:
            raise LlmkitError(f"block_size {cfg.block_size} exceeds the model's context of "
                              f"{self.base_model.config.block_size}")
        data = encode_chats(self.tokenizer, chats, cfg.block_size + 1, source=self.data_dir)
        if val_chats is not None:
            self.train_tokens = data
            self.val_tokens = encode_chats(self.tokenizer, val_chats, cfg.block_size + 1, source=self.val_path)
        else:
            self.train_tokens, self.val_tokens = split_data(data, self.val_fraction, cfg.seed)
        self.tokenizer_file = None  # the tokenizer (with its chat template) is saved whole in save()
        self.pad_id = next((i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0)
        self.data_stats = data.stats
        if distributed.detect().is_main:
            self.log(f"sft data {self.data_dir}: {describe(data.stats)}"
                     + (f"; {len(self.val_tokens)} held out for validation" if self.val_tokens else ""))

    def build_model_config(self):
        return self.base_model.config

    def build_model(self) -> torch.nn.Module:
        model = self.base_model
        if self.lora is not None:
            apply_lora(model, self.lora)  # after seeding: adapter init is reproducible
        return model.train()

    def _sampler(self, data, seed: int):
        return SFTSampler(data, self.config.block_size, self.config.batch_size, seed, self.pack, self.pad_id,
                          rank=self.dist.rank, world_size=self.dist.world_size)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """Mean cross-entropy over assistant tokens, with the output head run on those positions only:
        the (tokens x vocab) logits are the largest activation, and most positions have no target."""
        model = self.model if model is None else model
        keep = y != -100
        with _head_on(self.raw_model.lm_head, keep):
            logits, _ = model(x)
        return F.cross_entropy(logits.float(), y[keep])

    def next_batch(self, sampler):
        x, y = super().next_batch(sampler)
        if sampler is self.train_sampler:
            self._step_tokens += x.numel() * self.dist.world_size
            self._step_flops += sft_flops(self.raw_model, x, y) * self.dist.world_size
        return x, y

    def train_step(self) -> torch.Tensor:
        """The Trainer's step, counting the tokens of the (variable-width) batches it really drew and
        the FLOPs SFT really spends on them (the MFU the progress bar shows divides by these)."""
        self._step_tokens, self._step_flops = 0, 0
        loss = super().train_step()
        self.tokens_seen += self._step_tokens - self.tokens_per_step
        self.flops_per_token = self._step_flops / max(1, self._step_tokens)
        return loss

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Loss over every held-out conversation, weighted by assistant tokens."""
        if not self.val_tokens:
            return None
        model = self.raw_model
        model.eval()
        total, count = 0.0, 0
        for x, y in eval_batches(self.val_tokens, self.config.batch_size, self.pad_id):
            with self.autocast():
                loss = self.compute_loss(x.to(self.device), y.to(self.device), model=model)
            n = int((y != -100).sum())
            total, count = total + loss.float().item() * n, count + n
        model.train()
        return total / count

    # ---- checkpoints ---------------------------------------------------------------------------
    def save_shards(self, directory) -> None:
        """strategy=fsdp with LoRA: the adapters gathered whole for rank 0's adapter.safetensors, and
        sharded with their optimizer moments (not the frozen base) for resuming."""
        if self.lora is None:
            return super().save_shards(directory)
        self.adapter_state = sharded.gather_trainable(self.raw_model)
        sharded.save(directory, self.raw_model, self.optimizer, frozen=False)

    def write_checkpoint(self, directory) -> None:
        self.tokenizer.save(directory)  # whole, with its chat template
        if self.lora is None:
            return super().write_checkpoint(directory)
        # Adapter and state, both stamped with the step (checked again on resume).
        save_adapter(self.raw_model, directory, extra={"base": self.model_source, "train_step": self.step},
                     state=self.adapter_state if self.sharded else None)
        snapshots.fault_point()
        torch.save(self.training_state(), directory / train_state.STATE_FILE)
        snapshots.fault_point()

    def _resume(self) -> None:
        if self.lora is None:
            return super()._resume()
        directory = snapshots.current(self.out_dir)
        if directory is None:
            raise LlmkitError(f"cannot resume: {self.out_dir} holds no checkpoint")
        meta = read_adapter_config(directory)
        if meta.get("base") != self.model_source:
            raise LlmkitError(f"cannot resume: the adapter in {self.out_dir} was trained on "
                              f"{meta.get('base')!r}, not {self.model_source!r}")
        state = train_state.read_state(directory / train_state.STATE_FILE, meta.get("train_step"))
        if (state["optimizer"] == sharded.SHARDS) != self.sharded:
            kind = "whole (strategy=ddp)" if self.sharded else "sharded (strategy=fsdp)"
            raise LlmkitError(f"cannot resume: the checkpoint in {self.out_dir} is {kind}; resume with that strategy")
        if self.sharded:  # adapters and their moments, resharded to this world size
            sharded.load(directory / sharded.SHARDS, self.raw_model, self.optimizer, frozen=False)
        else:
            load_adapter_weights(self.raw_model, directory)  # same Parameters: the optimizer still holds them
        self.load_training_state(state)

    def fit(self) -> dict:
        metrics = super().fit()
        if self.lora is not None and self.merge and self.dist.is_main:
            self.write_merged(self.out_dir)
        return metrics

    def write_merged(self, out_dir) -> Path:
        """Save base + adapters folded together as a plain model directory (the adapters stay in place)."""
        from llmkit.io.checkpoint import save_checkpoint
        from llmkit.io.resolve import resolve_model

        if self.sharded:  # this rank holds slices only: the base again, with the adapter just saved
            model = resolve_model(self.model_source, dtype="float32")[0]
            load_adapter(model, snapshots.current(self.out_dir))
        else:
            model = copy.deepcopy(self.raw_model)
        merged = merge_lora(model)
        return save_checkpoint(out_dir, merged, self.tokenizer,
                               extra={"base": self.model_source, "lora": asdict(self.lora)})


def run_sft(model: str, data, out, val=None, epochs: int = 3, lr: float = 5e-5, batch_size: int = 16,
            seed: int = 0, device: str = "cpu", lora: LoRAConfig | None = None, max_steps: int | None = None,
            block_size: int = 512, pack: bool = False, merge: bool = True, resume: bool = False,
            settings=(), log=print) -> dict:
    """`llmkit finetune --task sft`: steps default to `epochs` passes over the training conversations,
    with a short warmup and cosine decay to lr/10 over the run; `settings` are TrainConfig KEY=VALUEs."""
    from llmkit.train.config import load_train_config

    config = load_train_config(None, settings, data_dir=str(data), out_dir=str(out), lr=lr, min_lr=lr / 10,
                               batch_size=batch_size, block_size=block_size, seed=seed, device=device,
                               max_steps=max_steps)
    trainer = SFTTrainer(config, model=model, lora=lora, pack=pack, val_data=val, merge=merge, resume=resume, log=log)
    if max_steps is None:
        if epochs < 1:
            raise LlmkitError(f"--epochs must be >= 1, got {epochs}")
        rows = trainer.train_sampler.rows_per_epoch
        config.max_steps = epochs * max(1, rows // (config.batch_size * config.grad_accum))
    if not any(s.startswith(("warmup_steps=", "lr_decay_steps=")) for s in settings):
        config.warmup_steps = max(1, config.max_steps // 20)
        config.lr_decay_steps = config.max_steps
    log(f"training {config.max_steps} steps of {config.batch_size} x {config.grad_accum} sequences")
    return trainer.fit()


def sft_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Training FLOPs of one SFT micro-batch: PaLM's 6 per weight and token, corrected for what SFT
    skips. Counting 6N per token of the block_size-wide rows overstated the work (MFU above 100%):
    frozen weights (LoRA) get no weight gradient (4 FLOPs, not 6), the output head runs on target
    positions only, and attention spans the batch's real width, not block_size."""
    cfg, head = model.config, model.lm_head.weight
    tables = {id(head), id(model.embed.weight)}  # lookups, not matmuls (a tied head is counted below)
    if model.pos_embed is not None:
        tables.add(id(model.pos_embed.weight))
    matrices = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]
    per_token = sum((6 if p.requires_grad else 4) * p.numel() for p in matrices)
    if not model.embed.weight.requires_grad:
        # Nothing before block 0 needs a gradient, so the matrices reading its input (qkv, a LoRA A)
        # compute none: 2 FLOPs per weight and token fewer.
        per_token -= 2 * sum(p.numel() for p in model.blocks[0].attn.qkv.parameters()
                             if p.dim() >= 2 and p.shape[-1] == cfg.n_embd)
    per_token += 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * x.shape[1]  # attention scores and values
    targets = int((y != -100).sum())
    return int(x.numel() * per_token + targets * (6 if head.requires_grad else 4) * head.numel())


@contextlib.contextmanager
def _head_on(head: torch.nn.Module, keep: torch.Tensor):
    """While active, `head` sees only the hidden states at positions where `keep` is True, so a
    forward pass returns (n_kept, vocab) logits instead of (B, T, vocab)."""
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep],) + args[1:])
    try:
        yield
    finally:
        handle.remove()
