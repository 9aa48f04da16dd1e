"""Knowledge distillation: train a student to match a teacher's next-token distributions.

Loss (Hinton et al., 2015), over the positions that have a target:
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)
T^2 keeps the soft term's gradients on the scale of the hard term's as T changes.

The teacher runs under torch.inference_mode() in eval mode. With `top_k`, the teacher's
distribution is first cut to its k most likely tokens (renormalised); `TeacherTopK` precomputes
that for every aligned window of the training split once, so training never runs the teacher. The
cache is kept in the output directory (teacher_topk.safetensors), so a resumed run does not pay for it again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.errors import LlmkitError
from llmkit.train.trainer import Trainer

IGNORE = -100


@dataclass
class TopK:
    """A teacher distribution kept as its k largest logits per position: (..., k) each."""
    values: torch.Tensor
    indices: torch.Tensor


def soft_cross_entropy(student_logits: torch.Tensor, teacher, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row of (N, V) student logits; teacher is (N, V) logits or TopK (N, k)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopK):
        log_p_t = F.log_softmax(teacher.values.float() / temperature, dim=-1)
        log_p_s = log_p_s.gather(-1, teacher.indices.long())
    else:
        log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def distillation_loss(student_logits: torch.Tensor, teacher, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Mixed soft/hard loss over positions whose target is not IGNORE.

    student_logits (B, T, V); teacher (B, T, V) logits or TopK with (B, T, k) tensors; targets (B, T).
    """
    if not isinstance(teacher, TopK) and teacher.size(-1) != student_logits.size(-1):
        raise LlmkitError(f"teacher vocabulary ({teacher.size(-1)}) does not match the student's "
                          f"({student_logits.size(-1)})")
    keep = targets != IGNORE
    s = student_logits[keep]
    hard = F.cross_entropy(s.float(), targets[keep])
    if alpha == 0:
        return hard
    t = TopK(teacher.values[keep], teacher.indices[keep]) if isinstance(teacher, TopK) else teacher[keep]
    soft = soft_cross_entropy(s, t, temperature).mean() * temperature ** 2
    return alpha * soft + (1 - alpha) * hard


def check_compatible(teacher, teacher_tok, student_config, student_tok) -> None:
    """Same vocabulary size and the same token <-> id map, or the distributions mean nothing."""
    tv, sv = teacher.config.vocab_size, student_config.vocab_size
    if tv != sv:
        raise LlmkitError(f"teacher vocab size {tv} != student vocab size {sv}: "
                          "distillation needs one shared tokenizer")
    if teacher_tok is not None and student_tok is not None and teacher_tok.hf.get_vocab() != student_tok.hf.get_vocab():
        raise LlmkitError("teacher and student tokenizers differ (same size, different tokens); "
                          "distillation needs one shared tokenizer")


@torch.inference_mode()
def teacher_logits(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits, _ = teacher(x)
    return logits


class TeacherTopK:
    """The teacher's top-k logits for every window tokens[i*B : i*B+B] of a split, computed once.

    Windows are aligned (non-overlapping) so each position has exactly one cached distribution;
    `AlignedWindowSampler` draws training batches from the same windows.
    """

    def __init__(self, teacher, tokens, block_size: int, k: int, batch_size: int = 16, device="cpu"):
        if k < 1:
            raise LlmkitError(f"top_k must be >= 1, got {k}")
        self.block_size, self.k = block_size, k
        n = (len(tokens) - 1) // block_size
        if n < 1:
            raise LlmkitError(f"split has {len(tokens)} tokens, fewer than block_size+1 = {block_size + 1}")
        self.values = torch.empty(n, block_size, k, dtype=torch.float16)
        self.indices = torch.empty(n, block_size, k, dtype=torch.int32)
        teacher.eval()
        start = time.perf_counter()
        for first in range(0, n, batch_size):
            rows = range(first, min(first + batch_size, n))
            x = torch.from_numpy(np.stack([np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype=np.int64)
                                           for i in rows]))
            top = teacher_logits(teacher, x.to(device)).float().topk(k, dim=-1)
            self.values[rows.start:rows.stop] = top.values.cpu().half()
            self.indices[rows.start:rows.stop] = top.indices.cpu().int()
        self.seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return self.values.shape[0]

    def save(self, path, key: dict) -> None:
        """Write the cache with `key` (what it was computed from) and the seconds it took, atomically."""
        from safetensors.torch import save_file

        from llmkit.utils import atomic_path

        with atomic_path(path) as tmp:
            save_file({"values": self.values, "indices": self.indices}, str(tmp),
                      metadata={"key": json.dumps(key, sort_keys=True), "seconds": str(self.seconds)})

    @classmethod
    def load(cls, path, key: dict) -> TeacherTopK | None:
        """The cache at `path` if it was computed for `key`, else None (it is then recomputed)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != json.dumps(key, sort_keys=True):
                    return None
                cache = cls.__new__(cls)
                cache.values, cache.indices = f.get_tensor("values"), f.get_tensor("indices")
        except (OSError, SafetensorError):
            return None
        cache.block_size, cache.k, cache.seconds = key["block_size"], key["k"], float(meta["seconds"])
        return cache

    def lookup(self, windows: torch.Tensor) -> TopK:
        return TopK(self.values[windows], self.indices[windows])


CACHE_FILE = "teacher_topk.safetensors"


@torch.no_grad()
def teacher_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the config and of every parameter's sum: a cache made with other weights does not match."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).numpy().tobytes()
    config = json.dumps(model.config.to_dict(), sort_keys=True).encode()
    return hashlib.sha1(config + sums).hexdigest()


def tokens_fingerprint(tokens) -> str:
    return hashlib.sha1(np.ascontiguousarray(tokens).tobytes()).hexdigest()


class AlignedWindowSampler:
    """Random batches of aligned windows (so TeacherTopK has their teacher targets); resumable.

    Same interface as RandomWindowSampler; `last_windows` names the windows of the last batch.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.n_windows = (len(tokens) - 1) // block_size
        if self.n_windows < 1:
            raise LlmkitError(f"split has {len(tokens)} tokens, fewer than block_size+1 = {block_size + 1}")
        self.generator = torch.Generator().manual_seed(seed)
        self.last_windows = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(self.n_windows, (self.batch_size * self.world_size,), generator=self.generator)
        self.last_windows = picks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        starts = self.last_windows.numpy() * self.block_size
        rows = np.asarray(self.tokens[starts[:, None] + np.arange(self.block_size + 1)]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))


class DistillTrainer(Trainer):
    """The standard Trainer (same data dir, presets, checkpoints, resume, DDP) with a distillation loss.

    Validation stays plain cross-entropy, so val_loss compares directly with a run trained from scratch.
    """

    def __init__(self, config, teacher, teacher_tokenizer=None, temperature: float = 2.0, alpha: float = 0.5,
                 top_k: int | None = None, resume: bool = False):
        if temperature <= 0:
            raise LlmkitError(f"temperature must be positive, got {temperature}")
        if not 0 <= alpha <= 1:
            raise LlmkitError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher, self.teacher_tokenizer = teacher.eval(), teacher_tokenizer
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha, self.top_k = temperature, alpha, top_k
        self.teacher_cache = None
        super().__init__(config, resume)
        self.teacher.to(self.device)

    def build_model_config(self):
        from llmkit.tokenizer import Tokenizer

        config = super().build_model_config()
        check_compatible(self.teacher, self.teacher_tokenizer, config, Tokenizer.load(self.tokenizer_file))
        return config

    def _sampler(self, tokens, seed: int):
        if self.top_k is None:
            return super()._sampler(tokens, seed)
        if tokens is self.train_tokens and self.teacher_cache is None:
            self.teacher_cache = self._teacher_cache(tokens)
        return AlignedWindowSampler(tokens, self.config.block_size, self.config.batch_size, seed,
                                    rank=self.dist.rank, world_size=self.dist.world_size)

    def _teacher_cache(self, tokens) -> TeacherTopK:
        """Read from out_dir when it was computed for this teacher, split, block size and k; else compute and keep."""
        path = self.out_dir / CACHE_FILE
        key = {"teacher": teacher_fingerprint(self.teacher), "tokens": tokens_fingerprint(tokens),
               "block_size": self.config.block_size, "k": self.top_k}
        cache = TeacherTopK.load(path, key)
        if cache is None:
            cache = TeacherTopK(self.teacher.to(self.device), tokens, self.config.block_size, self.top_k,
                                device=self.device)
            if self.dist.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                cache.save(path, key)
        return cache

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        model = self.model if model is None else model
        if not model.training:  # validation: the hard loss only
            return super().compute_loss(x, y, model)
        logits, _ = model(x)
        if self.teacher_cache is not None:
            top = self.teacher_cache.lookup(self.train_sampler.last_windows)
            teacher = TopK(top.values.to(self.device), top.indices.to(self.device))
        else:
            teacher = teacher_logits(self.teacher, x)
        return distillation_loss(logits, teacher, y, self.temperature, self.alpha)


class _StudentFromModel(DistillTrainer):
    """A student initialised from an existing model (its config and weights) instead of a preset."""

    def __init__(self, config, student, **kwargs):
        self.student = student
        super().__init__(config, **kwargs)

    def build_model_config(self):
        from llmkit.tokenizer import Tokenizer

        config = self.student.config
        check_compatible(self.teacher, self.teacher_tokenizer, config, Tokenizer.load(self.tokenizer_file))
        if self.config.block_size > config.block_size:
            raise LlmkitError(f"block_size {self.config.block_size} exceeds the student's context of {config.block_size}")
        return config

    def build_model(self):
        return self.student.train()


def run_distill(teacher: str, student: str, data_dir, out_dir, overrides=(), temperature: float = 2.0,
                alpha: float = 0.5, top_k: int | None = None, max_steps: int | None = None,
                resume: bool = False) -> dict:
    """`llmkit distill`: the student is a preset name (trained from scratch) or a model to start from."""
    from pathlib import Path

    from llmkit.io.resolve import EMBEDDED_MODELS, resolve_model
    from llmkit.model.config import PRESETS
    from llmkit.train.config import load_train_config

    is_preset = student in PRESETS
    if not is_preset and student not in EMBEDDED_MODELS and not Path(student).expanduser().exists():
        raise LlmkitError(f"--student {student!r} is neither a preset (choose from {', '.join(PRESETS)}) "
                          f"nor a model path or name ({', '.join(EMBEDDED_MODELS)})")
    config = load_train_config(None, overrides, data_dir=str(data_dir), out_dir=str(out_dir),
                               preset=student if is_preset else None, max_steps=max_steps)
    teacher_model, teacher_tok = resolve_model(teacher, dtype="float32")  # its logits as before
    options = dict(teacher=teacher_model, teacher_tokenizer=teacher_tok, temperature=temperature, alpha=alpha,
                   top_k=top_k, resume=resume)
    if is_preset:
        trainer = DistillTrainer(config, **options)
    else:
        student_model, _ = resolve_model(student, dtype="float32")  # trained: float weights
        trainer = _StudentFromModel(config, student_model, **options)
    return trainer.fit()
