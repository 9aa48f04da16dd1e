"""The training loop: `Trainer(TrainConfig).fit()`.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences
(split evenly across torchrun ranks), AMP autocast, gradient clipping, AdamW
with warmup + cosine LR. Rank 0 logs to metrics.jsonl / TensorBoard / a tqdm
bar and writes checkpoints that `Trainer(config, resume=True)` continues
from exactly (same batches, same dropout masks, same optimizer moments).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llmkit.train import continued, distributed
from llmkit.train import state as train_state
from llmkit.model.config import ModelConfig, preset
from llmkit.io import sharded, snapshots
from llmkit.errors import LlmkitError
from llmkit.train.losses import OBJECTIVES
from llmkit.train.optim import build_adamw, inverse_sqrt_lr, linear_lr, lr_at, set_lr
from llmkit.infer.cpu import optimize_for_training
from llmkit.train.perf import measure_peak_flops, mfu
from llmkit.train.config import TrainConfig, load_train_config
from llmkit.utils import atomic_open

__all__ = ["OBJECTIVES", "TrainConfig", "Trainer", "load_train_config"]

METRICS_FILE = "metrics.jsonl"
VAL_SEED = 20240917  # fixed, independent of config.seed: every run validates on the same windows
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str, dist_info: distributed.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LlmkitError(f"device {name!r} requested but CUDA is not available")
        if dist_info.enabled:  # one GPU per torchrun process
            return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False):
        self.config = cfg = config
        if cfg.objective not in OBJECTIVES:
            raise LlmkitError(f"unknown objective {cfg.objective!r}; choose from {', '.join(OBJECTIVES)}")
        self.dist = distributed.detect()
        self.device = resolve_device(cfg.device, self.dist)
        self.dtype = DTYPES[cfg.dtype]
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise LlmkitError("dtype float16 needs a CUDA device (use bfloat16 or float32 on CPU)")
        if cfg.batch_size % self.dist.world_size:
            raise LlmkitError(f"batch_size {cfg.batch_size} is not divisible by {self.dist.world_size} processes")
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        if cfg.strategy == "fsdp" and self.device.type == "cpu":  # before any tensor: FSDP's memory, really freed
            distributed.return_freed_buffers_to_os()
        self.out_dir = Path(cfg.out_dir)
        self.data_dir = Path(cfg.data_dir)
        if cfg.init_from and type(self).build_model is not Trainer.build_model:
            raise LlmkitError("init_from is for decoder training (`llmkit train`); this trainer takes --model")
        self._check_out_dir(resume)
        self._load_data()
        self._seed_everything(cfg.seed)
        self.model_config = self.build_model_config()
        self.raw_model = optimize_for_training(self.build_model().to(self.device))
        self.sharded = cfg.strategy == "fsdp"
        self._owns_group = distributed.init(self.dist, self.device, always=self.sharded)
        if cfg.activation_checkpointing:
            distributed.checkpoint_activations(self.raw_model)
        if self.sharded:
            if self.dtype == torch.float16:
                raise LlmkitError("strategy=fsdp trains in float32 or bfloat16 (float16 needs a gradient scaler "
                                  "over sharded gradients, which llmkit does not do)")
            distributed.shard(self.raw_model, self.dtype if self.dtype != torch.float32 else None,
                              cfg.fsdp_unit_mb)
        self.optimizer = build_adamw(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                     self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.train_sampler = self._sampler(self.train_tokens, cfg.seed)
        self.step = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0  # training seconds spent by earlier (resumed-from) processes
        if resume:
            self._resume()
        self.model = self.raw_model
        if cfg.compile:
            self.model = torch.compile(self.model)
        if not self.sharded:
            self.model = distributed.wrap(self.model, self.dist, self.device)
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        self.flops_per_token = self.raw_model.flops_per_token(cfg.block_size)
        self.writer = None
        self.last_metrics: dict = {}

    def _check_out_dir(self, resume: bool) -> None:
        """Never replace a checkpoint by accident; clear what interrupted saves left behind."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise LlmkitError(f"out_dir {self.out_dir} exists and is not a directory")
        if not resume and not self.config.overwrite and snapshots.holds_checkpoint(self.out_dir):
            raise LlmkitError(f"{self.out_dir} already holds a checkpoint: continue it with --resume, "
                              "or replace it with --overwrite (overwrite=true)")
        if self.dist.is_main and self.out_dir.is_dir():
            snapshots.clean(self.out_dir)

    # ---- set-up ------------------------------------------------------------------------------
    def _load_data(self) -> None:
        from llmkit.data.corpus import load_meta, load_split

        if not self.data_dir.is_dir():
            raise LlmkitError(f"data dir {self.data_dir} does not exist (create it with `llmkit prepare`)")
        self.meta = load_meta(self.data_dir)
        self.tokenizer_file = self.data_dir / "tokenizer.json"
        if not self.tokenizer_file.exists():
            raise LlmkitError(f"data dir {self.data_dir} has no tokenizer.json")
        self.train_tokens = load_split(self.data_dir, "train")
        self.val_tokens = load_split(self.data_dir, "val")
        if len(self.train_tokens) <= self.config.block_size:
            raise LlmkitError(f"{self.data_dir}/train.bin has {len(self.train_tokens)} tokens, "
                              f"fewer than block_size+1 = {self.config.block_size + 1}")

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def build_model_config(self) -> ModelConfig:
        cfg = self.config
        if cfg.init_from:  # continued pretraining: the model's own config, weights and tokenizer
            self.init_model, self.init_tokenizer, mc = continued.load_start(
                cfg.init_from, self.tokenizer_file, self.data_dir, cfg.block_size, cfg.model)
            return mc
        vocab_size = int(self.meta["vocab_size"])
        mc = preset(cfg.preset, **{"vocab_size": vocab_size, "block_size": cfg.block_size, **cfg.model})
        if mc.vocab_size < vocab_size:
            raise LlmkitError(f"model.vocab_size={mc.vocab_size} is smaller than the data's vocab of {vocab_size}")
        if mc.block_size < cfg.block_size:
            raise LlmkitError(f"block_size {cfg.block_size} exceeds model.block_size={mc.block_size}")
        return mc

    def build_model(self) -> torch.nn.Module:
        from llmkit.model.decoder import GPT

        model = GPT(self.model_config)
        if self.config.init_from:
            continued.copy_weights(model, self.init_model, self.config.init_from, self.config.model)
            del self.init_model
        return model

    def _sampler(self, tokens, seed: int):
        from llmkit.data.corpus import RandomWindowSampler

        # The sampler takes the per-rank batch and slices one global batch drawn identically on every rank.
        return RandomWindowSampler(tokens, self.config.block_size, self.config.batch_size // self.dist.world_size,
                                   seed, rank=self.dist.rank, world_size=self.dist.world_size)

    def _resume(self) -> None:
        state = train_state.load(self.out_dir, self.raw_model, self.model_config.to_dict(), weights=not self.sharded)
        if self.sharded:  # weights and optimizer moments, resharded to this world size
            sharded.load(snapshots.current(self.out_dir) / sharded.SHARDS, self.raw_model, self.optimizer)
        self.load_training_state(state)

    def training_state(self) -> dict:
        """Everything besides the weights needed to continue exactly (plain tensors/containers)."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed(),
                "optimizer": sharded.SHARDS if self.sharded else self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "sampler": self.train_sampler.state_dict(), "rng": train_state.capture_rng(),
                "config": self.config.to_dict()}

    def load_training_state(self, state: dict) -> None:
        try:
            if not self.sharded:
                self.optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            self.train_sampler.load_state_dict(state["sampler"])
            train_state.restore_rng(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise LlmkitError(f"cannot resume from {self.out_dir}: training state does not fit "
                              f"this run ({str(e).splitlines()[0]})") from None
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.elapsed_before = float(state.get("elapsed", 0.0))

    # ---- one step ----------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """The single place the training objective is evaluated; override or register in OBJECTIVES."""
        return OBJECTIVES[self.config.objective](self.model if model is None else model, x, y)

    def next_batch(self, sampler) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sampler.next_batch()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the mean micro-batch loss as a tensor (no host sync)."""
        cfg = self.config
        if cfg.lr_schedule == "inverse_sqrt":
            set_lr(self.optimizer, inverse_sqrt_lr(self.step, cfg.lr, cfg.warmup_steps))
        elif cfg.lr_schedule == "linear":
            set_lr(self.optimizer, linear_lr(self.step, cfg.lr, cfg.warmup_steps, cfg.lr_decay_steps))
        else:
            set_lr(self.optimizer, lr_at(self.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.lr_decay_steps))
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.next_batch(self.train_sampler)
            # DDP all-reduces gradients in backward; only the last micro-step needs it.
            with distributed.grad_sync(self.model, micro == cfg.grad_accum - 1):
                with self.autocast():
                    loss = self.compute_loss(x, y) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return total

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation loss averaged over eval_iters batches (and over ranks); None without val data."""
        if len(self.val_tokens) <= self.config.block_size:
            return None
        sampler = self._sampler(self.val_tokens, VAL_SEED)  # fresh: the same windows at every evaluation
        # The unwrapped eager model: no DDP hooks needed without gradients, and no second
        # torch.compile graph (no_grad/eval mode) for a few batches.
        model = self.raw_model
        model.eval()
        total = torch.zeros((), device=self.device)
        for _ in range(self.config.eval_iters):
            x, y = self.next_batch(sampler)
            with self.autocast():
                total += self.compute_loss(x, y, model=model).float()
        model.train()
        return distributed.mean_across(total / self.config.eval_iters).item()

    def validate(self) -> None:
        """Evaluate and log; recipes with task metrics instead of a validation loss override this."""
        val_loss = self.evaluate()
        if val_loss is not None:
            self._log({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to max_steps; returns the last logged metrics (loss, val_loss, tokens_per_s, ...)."""
        cfg, main = self.config, self.dist.is_main
        try:
            if main:
                self._open_logs()
            peak = (cfg.peak_flops or measure_peak_flops(self.device, self.dtype)) * self.dist.world_size
            bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (main and cfg.progress),
                       file=sys.stderr, dynamic_ncols=True, desc="train",
                       mininterval=0.5 if sys.stderr.isatty() else 10.0)  # sparse lines in CI logs
            self.model.train()
            self._start = time.perf_counter()
            window_start, window_steps, loss_sum = time.perf_counter(), 0, None
            window_tokens = self.tokens_seen  # tps from tokens actually seen: SFT batches vary in width
            first_step = self.step
            while self.step < cfg.max_steps:
                loss = self.train_step()
                loss_sum = loss if loss_sum is None else loss_sum + loss
                window_steps += 1
                bar.update(1)
                done = self.step == cfg.max_steps
                if self.step % cfg.log_interval == 0 or done:
                    # .item() waits for the device, so it happens only at log points.
                    mean_loss = distributed.mean_across(loss_sum / window_steps).item()
                    if not math.isfinite(mean_loss):
                        raise LlmkitError(f"loss is {mean_loss} at step {self.step}; lower lr or use float32")
                    dt = time.perf_counter() - window_start
                    tps = (self.tokens_seen - window_tokens) / dt
                    self._log({"step": self.step, "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
                               "tokens_per_s": tps, "mfu": mfu(self.flops_per_token, tps, peak),
                               "ms_per_step": 1000 * dt / window_steps, "tokens": self.tokens_seen})
                    bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}",
                                    mfu=f"{100 * mfu(self.flops_per_token, tps, peak):.1f}%")
                    loss_sum, window_steps, window_start = None, 0, time.perf_counter()
                    window_tokens = self.tokens_seen
                pause = time.perf_counter()
                if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or done:
                    self.validate()
                if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or done:
                    self.save()
                window_start += time.perf_counter() - pause  # eval/checkpoint time is not training time
            bar.close()
            if self.step == first_step and main:
                print(f"already at step {self.step} of max_steps={cfg.max_steps}; nothing to train", file=sys.stderr)
        finally:
            self.close()
        return self.last_metrics

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - getattr(self, "_start", time.perf_counter())

    def _open_logs(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / METRICS_FILE
        # A fresh run starts a new log; a resumed one keeps only records up to the resumed step
        # (a crashed run may have logged past its last checkpoint).
        kept = []
        if self.step and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= self.step:
                        kept.append(line + "\n")
        with atomic_open(path) as f:
            f.writelines(kept)
        self._metrics = open(path, "a", encoding="utf-8")
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step or None)

    def _log(self, record: dict) -> None:
        record["elapsed"] = round(self.elapsed(), 3)
        self.last_metrics.update(record)
        if not self.dist.is_main:
            return
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, record["step"])

    def save(self) -> None:
        """Checkpoint to out_dir: a new step directory, committed atomically (llmkit.io.snapshots).
        Rank 0 writes the model directory and state; with strategy=fsdp every rank writes its shard."""
        stage = snapshots.staging_dir(self.out_dir, self.step)
        if self.dist.is_main:
            snapshots.begin(self.out_dir, self.step)
        distributed.barrier()
        if self.sharded:
            self.save_shards(stage / sharded.SHARDS)
            distributed.barrier()
        if self.dist.is_main:
            try:
                self.write_checkpoint(stage)
            except Exception:  # e.g. disk full: drop the partial step now (a kill leaves it to clean())
                shutil.rmtree(stage, ignore_errors=True)
                raise
            snapshots.commit(self.out_dir, stage)
        distributed.barrier()

    def save_shards(self, directory: Path) -> None:
        """Collective (strategy=fsdp): every rank writes its shard of the weights and optimizer moments."""
        sharded.save(directory, self.raw_model, self.optimizer)

    def write_checkpoint(self, directory: Path) -> None:
        """Write this step's files into `directory` (rank 0); subclasses add or swap files."""
        tokenizer = getattr(self, "init_tokenizer", None)  # the model's own, with its chat template
        if tokenizer is not None:
            tokenizer.save(directory)
        train_state.write(directory, self.raw_model, self.training_state(),
                          self.tokenizer_file if tokenizer is None else None, weights=not self.sharded)

    def close(self) -> None:
        if getattr(self, "_metrics", None) is not None:
            self._metrics.close()
            self._metrics = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._owns_group:
            distributed.shutdown()
            self._owns_group = False
