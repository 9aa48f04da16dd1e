"""Pretraining and contrastive training of encoders with the standard Trainer.

`EncoderTrainer(config)` is the Trainer (accumulation, AMP, clipping, cosine LR, checkpoints, exact
resume, DDP) with the model, batches and loss swapped for config.objective:
  mlm          a BERT-style encoder from an encoder preset, trained from scratch on the token windows of
               a prepared data dir; windows are masked 15% / 80-10-10 by the sampler (its RNG state is
               checkpointed, so resume replays the same masks). A tokenizer without a mask token gets
               `<|mask|>` appended; the checkpoint keeps that tokenizer.
  contrastive  an existing encoder (`model=`) trained for sentence embeddings with InfoNCE over in-batch
               negatives. data_dir is a file: .txt (one sentence per line: unsupervised SimCSE, two
               dropout views of each sentence) or .jsonl with {"anchor", "positive"} pairs (supervised).
               Under DDP, negatives are the other pairs on the same rank.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from llmkit.io.encoders import load_encoder, mask_token_id, pad_batch, read_lines, special_token_ids, tokenize
from llmkit.errors import LlmkitError
from llmkit.model.encoder import ENCODER_PRESETS, Encoder, EncoderConfig, encoder_preset
from llmkit.train.losses import ENCODER_OBJECTIVES, contrastive_objective, mask_tokens
from llmkit.train.trainer import Trainer, TrainConfig

DEFAULT_ENCODER_PRESET = "bert-tiny"
CONTRASTIVE_VAL_FRACTION = 0.05


class MaskedWindowSampler:
    """Random token windows (llmkit.data.corpus.RandomWindowSampler), BERT-masked: (inputs, labels).

    Like the windows, the masks are drawn for the whole global batch from a generator seeded alike on
    every rank, and each rank keeps its rows: N ranks train on exactly what one process would."""

    def __init__(self, windows, mask_id: int, vocab_size: int, special_ids: list[int], seed: int,
                 rank: int = 0, world_size: int = 1):
        self.windows, self.mask_id, self.vocab_size, self.special_ids = windows, mask_id, vocab_size, special_ids
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.windows.next_batch()
        mine = slice(self.rank * len(x), (self.rank + 1) * len(x))
        full = x.new_zeros((len(x) * self.world_size, x.shape[1]))  # other ranks' rows: only their draws matter
        full[mine] = x
        inputs, labels = mask_tokens(full, self.mask_id, self.vocab_size, self.special_ids, generator=self.generator)
        return inputs[mine], labels[mine]

    def state_dict(self) -> dict:
        return {"windows": self.windows.state_dict(), "mask_rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state["windows"])
        self.generator.set_state(state["mask_rng"])


class PairSampler:
    """Shuffled epochs over (anchor ids, positive ids) pairs; each global batch is sliced across ranks."""

    def __init__(self, pairs, batch_size: int, pad_id: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(pairs) < 2 * batch_size * world_size:
            raise LlmkitError(f"contrastive training needs at least {2 * batch_size * world_size} pairs "
                              f"(two batches), got {len(pairs)}")
        self.pairs, self.batch_size, self.pad_id = pairs, batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        return torch.randperm(len(self.pairs), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.batch_size * self.world_size
        if self.pos + size > len(self._order):  # drop the ragged tail: every batch has B negatives
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffle()
        mine = self._order[self.pos + self.rank * self.batch_size: self.pos + (self.rank + 1) * self.batch_size]
        self.pos += size
        return (pad_batch([self.pairs[i][0] for i in mine], self.pad_id)[0],
                pad_batch([self.pairs[i][1] for i in mine], self.pad_id)[0])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """.txt: each line paired with itself (unsupervised). .jsonl: {"anchor", "positive"} per line."""
    pairs = []
    for n, line in enumerate(read_lines(path), 1):
        if path.suffix != ".jsonl":
            pairs.append((line.strip(), line.strip()))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        pair = (record.get("anchor"), record.get("positive")) if isinstance(record, dict) else (None, None)
        if not all(isinstance(t, str) and t.strip() for t in pair):
            raise LlmkitError(f"{path}:{n}: expected {{\"anchor\": text, \"positive\": text}}")
        pairs.append((pair[0].strip(), pair[1].strip()))
    return pairs


class EncoderTrainer(Trainer):
    def __init__(self, config, model: str | None = None, resume: bool = False):
        if config.objective not in ENCODER_OBJECTIVES:
            raise LlmkitError(f"EncoderTrainer trains {', '.join(ENCODER_OBJECTIVES)}, not {config.objective!r}")
        if config.objective == "contrastive" and model is None:
            raise LlmkitError("contrastive training starts from an encoder: give --model "
                              "(all-minilm-l6-v2, an llmkit encoder dir or a HF BERT dir)")
        if config.objective in ("mlm", "mlm+nsp") and model is not None:
            raise LlmkitError("mlm pretraining starts from scratch on a prepared data dir; drop --model")
        self.model_source = model
        super().__init__(config, resume)

    # ---- data and model ------------------------------------------------------------------------
    def _load_data(self) -> None:
        if self.config.objective in ("mlm", "mlm+nsp"):
            super()._load_data()
            from llmkit.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(self.tokenizer_file)
            if mask_token_id(self.tokenizer) is None:
                self.tokenizer.hf.add_special_tokens(["<|mask|>"])  # appended: data token ids are unchanged
            self.tokenizer_file = None  # saved whole (with the mask token) in save()
            return
        path = self.data_dir
        if not path.is_file():
            raise LlmkitError(f"contrastive data {path} must be a .txt or .jsonl file")
        self.base_model, self.tokenizer = load_encoder(self.model_source)
        self.tokenizer_file = None  # saved in save(), with the truncation limit of the model, not of training
        texts = read_pairs(path)
        model_limit = dict(self.tokenizer.hf.truncation)
        self.tokenizer.hf.enable_truncation(min(self.config.block_size, self.base_model.config.max_length))
        enc = tokenize(self.tokenizer, [t for pair in texts for t in pair], "sentences")
        self.tokenizer.hf.enable_truncation(**model_limit)
        pairs = [(enc[2 * i].ids, enc[2 * i + 1].ids) for i in range(len(texts))]
        n_val = int(len(pairs) * CONTRASTIVE_VAL_FRACTION)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(self.config.seed)).tolist()
        self.val_tokens = [pairs[i] for i in order[:n_val]]
        self.train_tokens = [pairs[i] for i in order[n_val:]]

    def build_model_config(self) -> EncoderConfig:
        cfg = self.config
        if cfg.objective == "contrastive":
            return EncoderConfig.from_dict({**self.base_model.config.to_dict(), **cfg.model})
        name = DEFAULT_ENCODER_PRESET if cfg.preset == TrainConfig.preset else cfg.preset  # the default is a decoder's
        if name not in ENCODER_PRESETS:
            raise LlmkitError(f"preset {cfg.preset!r} is not an encoder preset; for --objective mlm choose "
                              f"from {', '.join(ENCODER_PRESETS)}")
        vocab = max(int(self.meta["vocab_size"]), self.tokenizer.vocab_size)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        mc = encoder_preset(name, **{"vocab_size": vocab, "max_position": cfg.block_size,
                                           "pad_token_id": pad, **cfg.model})
        if mc.vocab_size < vocab:
            raise LlmkitError(f"model.vocab_size={mc.vocab_size} is smaller than the tokenizer's {vocab}")
        if mc.max_length < cfg.block_size:
            raise LlmkitError(f"block_size {cfg.block_size} exceeds the encoder's maximum of {mc.max_length}")
        return mc

    def build_model(self) -> Encoder:
        if self.config.objective == "mlm+nsp":
            from llmkit.model.heads import PretrainingEncoder

            return PretrainingEncoder(self.model_config)
        if self.config.objective == "mlm":
            return Encoder(self.model_config, task="mlm")
        model = Encoder(self.model_config)  # the base's weights with this run's config (e.g. its dropout)
        model.load_state_dict({k: v for k, v in self.base_model.state_dict().items() if not k.startswith("mlm.")})
        del self.base_model
        return model

    def _sampler(self, data, seed: int):
        if self.config.objective == "contrastive":
            return PairSampler(data, self.config.batch_size // self.dist.world_size, self.model_config.pad_token_id,
                               seed, self.dist.rank, self.dist.world_size)
        if self.config.objective == "mlm+nsp":
            from llmkit.train.nsp import NextSentenceSampler, boundary_ids

            return NextSentenceSampler(data, self.config.block_size, self.config.batch_size // self.dist.world_size,
                                       *boundary_ids(self.tokenizer), mask_token_id(self.tokenizer),
                                       self.model_config.vocab_size, special_token_ids(self.tokenizer), seed,
                                       self.dist.rank, self.dist.world_size)
        return MaskedWindowSampler(super()._sampler(data, seed), mask_token_id(self.tokenizer),
                                   self.model_config.vocab_size, special_token_ids(self.tokenizer), seed,
                                   self.dist.rank, self.dist.world_size)

    # ---- contrastive batches vary in width: count the tokens really seen -----------------------
    def next_batch(self, sampler):
        x, y = super().next_batch(sampler)
        if self.config.objective == "contrastive" and sampler is self.train_sampler:
            self._step_tokens += (x.numel() + y.numel()) * self.dist.world_size
        return x, y

    def train_step(self) -> torch.Tensor:
        self._step_tokens = 0
        loss = super().train_step()
        if self.config.objective == "contrastive":
            self.tokens_seen += self._step_tokens - self.tokens_per_step
        return loss

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if self.config.objective in ("mlm", "mlm+nsp"):
            return super().evaluate()
        if len(self.val_tokens) < 2:
            return None
        # every held-out pair once, in fixed batches; dropout is off, so this scores the embeddings
        self.model.eval()
        total, count, bs = 0.0, 0, self.config.batch_size
        for i in range(0, len(self.val_tokens), bs):
            chunk = self.val_tokens[i: i + bs]
            if len(chunk) < 2:  # a lone pair has no negatives to score against
                break
            x = pad_batch([p[0] for p in chunk], self.model_config.pad_token_id)[0].to(self.device)
            y = pad_batch([p[1] for p in chunk], self.model_config.pad_token_id)[0].to(self.device)
            with self.autocast():
                total += contrastive_objective(self.raw_model, x, y).float().item() * len(chunk)
            count += len(chunk)
        self.model.train()
        return total / count

    def write_checkpoint(self, directory) -> None:
        self.tokenizer.save(directory)  # whole: with the mask token (mlm) or the model's truncation limit
        super().write_checkpoint(directory)
