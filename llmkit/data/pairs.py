"""Source/target pairs for sequence-to-sequence training: JSONL in, token shards out, padded batches.

Input: JSONL, one {"source": ..., "target": ...} per line (translation, summarization, ...).
`prepare_pairs` tokenizes both sides with one (joint) tokenizer and writes, per split,
{split}.pairs.npz: the sources' ids end to end plus offsets, and the same for the targets.
Sources end with EOS; targets are BOS (the decoder's start token) + text + EOS.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.utils import atomic_open, atomic_path

META_FILE = "meta.json"


def read_pairs(path) -> list[tuple[str, str]]:
    """Every (source, target) of a JSONL file; the first bad line is an error naming file and line."""
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read pairs file {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not {"source", "target"} <= set(record):
            raise LlmkitError(f"{path}:{n}: expected an object with \"source\" and \"target\"")
        for side in ("source", "target"):
            if not isinstance(record[side], str) or not record[side].strip():
                raise LlmkitError(f"{path}:{n}: the {side} is empty (each pair needs text on both sides)")
        pairs.append((record["source"], record["target"]))
    if not pairs:
        raise LlmkitError(f"{path} holds no pairs")
    return pairs


def read_all_pairs(inputs) -> list[tuple[str, str]]:
    """Pairs of every .jsonl file given (directories are searched for *.jsonl)."""
    files = []
    for item in ([inputs] if isinstance(inputs, (str, Path)) else inputs):
        path = Path(item)
        found = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
        if not found or not all(p.suffix == ".jsonl" for p in found):
            raise LlmkitError(f"{path}: pairs come from .jsonl files ({{\"source\": ..., \"target\": ...}} per line)")
        files += found
    return [pair for f in files for pair in read_pairs(f)]


def _pack(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    ids = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def prepare_pairs(inputs, out_dir, tokenizer, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Tokenize JSONL pairs into out_dir/{train,val}.pairs.npz + meta.json + tokenizer.json."""
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name in ("bos_id", "eos_id", "pad_id"):
        if getattr(tokenizer, name) is None:
            raise LlmkitError(f"the tokenizer has no {name[:3].upper()} token, which seq2seq pairs need")
    pairs = read_all_pairs(inputs)
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = int(round(len(pairs) * val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pairs", "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "pairs": {}}
    for split, index in splits.items():
        src = [tokenizer.encode(pairs[i][0]) + [tokenizer.eos_id] for i in index]
        tgt = [[tokenizer.bos_id] + tokenizer.encode(pairs[i][1]) + [tokenizer.eos_id] for i in index]
        (src_ids, src_off), (tgt_ids, tgt_off) = _pack(src), _pack(tgt)
        with atomic_path(out / f"{split}.pairs.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, src=src_ids, src_offsets=src_off, tgt=tgt_ids, tgt_offsets=tgt_off)
        meta["pairs"][split] = len(index)
        meta[f"{split}_tokens"] = int(len(src_ids) + len(tgt_ids))
        meta[f"{split}_longest"] = [max((len(r) for r in src), default=0), max((len(r) for r in tgt), default=0)]
    tokenizer.save(out)
    with atomic_open(out / META_FILE) as f:  # last: it never describes missing shards
        json.dump(meta, f, indent=2)
    return meta


@dataclass
class PairData:
    src: list[np.ndarray]
    tgt: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.src)


def load_pairs(data_dir, split: str) -> PairData:
    path = Path(data_dir) / f"{split}.pairs.npz"
    try:
        with np.load(path) as z:
            src, so, tgt, to = z["src"], z["src_offsets"], z["tgt"], z["tgt_offsets"]
    except (OSError, KeyError, ValueError) as e:
        raise LlmkitError(f"cannot read {path}: {e}; re-run `llmkit prepare --pairs`") from None
    return PairData([src[a:b] for a, b in zip(so[:-1], so[1:])], [tgt[a:b] for a, b in zip(to[:-1], to[1:])])


def check_lengths(data: PairData, block_size: int, where: str) -> None:
    """Refuse (never silently truncate) a pair longer than the model's context, naming it."""
    for i, (s, t) in enumerate(zip(data.src, data.tgt)):
        if len(s) > block_size or len(t) - 1 > block_size:
            raise LlmkitError(f"{where}: pair {i} has a {len(s)}-token source and a {len(t) - 1}-token target; "
                              f"block_size is {block_size}: drop or shorten such pairs, or raise block_size")


def collate(src_rows, tgt_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """x: sources (B, S) padded with -1; y: targets (B, T) padded with -100 (the ignored label)."""
    x = torch.full((len(src_rows), max(len(r) for r in src_rows)), -1, dtype=torch.long)
    y = torch.full((len(tgt_rows), max(len(r) for r in tgt_rows)), -100, dtype=torch.long)
    for i, (s, t) in enumerate(zip(src_rows, tgt_rows)):
        x[i, :len(s)] = torch.from_numpy(s.astype(np.int64))
        y[i, :len(t)] = torch.from_numpy(t.astype(np.int64))
    return x, y


class PairSampler:
    """Shuffled epochs of pairs, one global batch at a time; rank r of w takes its slice of each batch.
    Batches hold pairs of similar length: each pool of POOL_BATCHES shuffled batches is sorted by length
    before it is cut, and the batches then come in random order. Short messages padded to the longest
    of a random batch would waste about two thirds of every step. The order depends on (seed, epoch)
    only, so state_dict() (epoch, position) resumes exactly."""

    POOL_BATCHES = 64

    def __init__(self, data: PairData, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(data) < batch_size * world_size:
            raise LlmkitError(f"{len(data)} pairs are fewer than one batch of {batch_size * world_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self.tokens_drawn = 0  # source + target tokens of this rank's batches so far
        self.lengths = np.array([len(s) + len(t) for s, t in zip(data.src, data.tgt)])
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        """This epoch's pairs, whole global batches end to end (a last partial batch is left out)."""
        if self._cached is None or self._cached[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            total = self.batch_size * self.world_size
            order = rng.permutation(len(self.data))[:len(self.data) // total * total]
            pool = total * self.POOL_BATCHES
            for start in range(0, len(order), pool):
                chunk = order[start:start + pool]
                order[start:start + pool] = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches = order.reshape(-1, total)
            self._cached = (self.epoch, batches[rng.permutation(len(batches))].reshape(-1))
        return self._cached[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        total = self.batch_size * self.world_size
        if self.position + total > len(self._order()):
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order()[self.position:self.position + total][self.rank::self.world_size]
        self.position += total
        src, tgt = [self.data.src[i] for i in index], [self.data.tgt[i] for i in index]
        self.tokens_drawn += sum(len(r) for r in src) + sum(len(r) for r in tgt)
        return collate(src, tgt)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler seed {state['seed']} != {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def in_order(data: PairData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every pair once, in order (validation)."""
    for i in range(0, len(data), batch_size):
        yield collate(data.src[i:i + batch_size], data.tgt[i:i + batch_size])
