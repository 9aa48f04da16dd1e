"""`llmkit train --objective seq2seq`: the Trainer's loop over source/target pairs.

Only the data (PairSampler batches), the model (a Seq2Seq from a preset, or an imported Marian,
BART or T5 to fine-tune) and the loss change: teacher forcing with label smoothing, counted over
the target tokens. Accumulation, mixed precision, clipping, checkpoints, exact resume and DDP are
the Trainer's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmkit.data.pairs import PairSampler, check_lengths, in_order, load_pairs
from llmkit.errors import LlmkitError
from llmkit.model.seq2seq import SEQ2SEQ_PRESETS, Seq2Seq, seq2seq_preset
from llmkit.train import distributed
from llmkit.train.losses import OBJECTIVES
from llmkit.train.trainer import Trainer


def seq2seq_loss(model, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """x: sources (B, S) padded with -1; y: BOS + target + EOS (B, T) padded with -100. The decoder
    reads y[:, :-1] and predicts y[:, 1:]; padding is never attended to and never scored."""
    tgt_in = y[:, :-1].clamp(min=0)  # padding sits after the real tokens: causal attention never sees it
    logits, _ = model(x.clamp(min=0), tgt_in, src_mask=x >= 0)
    return F.cross_entropy(logits.flatten(0, 1).float(), y[:, 1:].flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


OBJECTIVES["seq2seq"] = seq2seq_loss


class Seq2SeqTrainer(Trainer):
    def __init__(self, config, model: str | None = None, resume: bool = False):
        self.base_source = model
        super().__init__(config, resume)

    # ---- data and model ------------------------------------------------------------------------
    def _load_data(self) -> None:
        from llmkit.utils import read_json

        cfg = self.config
        if not self.data_dir.is_dir():
            raise LlmkitError(f"data dir {self.data_dir} does not exist (create it with `llmkit prepare --pairs`)")
        self.meta = read_json(self.data_dir / "meta.json", missing=f"{self.data_dir} is not a prepared data "
                              "directory (no meta.json); run `llmkit prepare --pairs` first")
        if self.meta.get("format") != "pairs":
            raise LlmkitError(f"{self.data_dir} holds plain text; --objective seq2seq trains on source/target "
                              "pairs: `llmkit prepare --pairs pairs.jsonl --out DIR`")
        self.tokenizer_file = self.data_dir / "tokenizer.json"
        self.base_model = None
        if self.base_source is not None:
            from llmkit.io.resolve import resolve_model

            self.base_model, _ = resolve_model(self.base_source, dtype="float32")  # trained: floats
            if getattr(self.base_model, "arch", None) != "seq2seq":
                raise LlmkitError(f"{self.base_source} is a decoder-only model; --objective seq2seq needs an "
                                  "encoder-decoder (a seq2seq preset, or a Marian/BART/T5 or llmkit seq2seq dir)")
        self.train_tokens = load_pairs(self.data_dir, "train")
        self.val_tokens = load_pairs(self.data_dir, "val")
        for split, data in (("train", self.train_tokens), ("val", self.val_tokens)):
            check_lengths(data, cfg.block_size, f"{self.data_dir}/{split}.pairs.npz")

    def build_model_config(self):
        cfg = self.config
        if self.base_model is not None:
            return self.base_model.config
        if cfg.preset not in SEQ2SEQ_PRESETS:
            raise LlmkitError(f"preset {cfg.preset!r} is a decoder-only or encoder model; --objective seq2seq "
                              f"needs an encoder-decoder preset ({', '.join(SEQ2SEQ_PRESETS)})")
        m = self.meta
        return seq2seq_preset(cfg.preset, **{"vocab_size": m["vocab_size"], "block_size": cfg.block_size,
                                             "pad_id": m["pad_id"], "eos_id": m["eos_id"],
                                             "decoder_start_id": m["bos_id"], **cfg.model})

    def build_model(self) -> torch.nn.Module:
        return self.base_model.train() if self.base_model is not None else Seq2Seq(self.model_config)

    def _sampler(self, data, seed: int):
        return PairSampler(data, self.config.batch_size // self.dist.world_size, seed,
                           rank=self.dist.rank, world_size=self.dist.world_size)

    # ---- loss, token counts, validation ---------------------------------------------------------
    def compute_loss(self, x, y, model=None) -> torch.Tensor:
        return seq2seq_loss(self.model if model is None else model, x, y, self.config.label_smoothing)

    def train_step(self) -> torch.Tensor:
        """The Trainer's step; tokens_seen counts the real (unpadded) tokens the sampler handed out."""
        before = self.train_sampler.tokens_drawn
        loss = super().train_step()
        drawn = (self.train_sampler.tokens_drawn - before) * self.dist.world_size
        self.tokens_seen += drawn - self.tokens_per_step
        return loss

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Cross-entropy (no smoothing) over every held-out pair, weighted by target tokens."""
        if not len(self.val_tokens):
            return None
        model = self.raw_model
        model.eval()
        total, count = 0.0, 0
        for x, y in in_order(self.val_tokens, self.config.batch_size):
            with self.autocast():
                loss = seq2seq_loss(model, x.to(self.device), y.to(self.device))
            n = int((y[:, 1:] >= 0).sum())
            total, count = total + loss.float().item() * n, count + n
        model.train()
        return distributed.mean_across(torch.tensor(total / count, device=self.device)).item()
