"""The KV cache: keys and values of every layer, one write position per row.

Row r holds its tokens in slots 0..lengths[r]-1. A forward call over the first B rows with T new
tokens per row writes them to slots lengths[r]..lengths[r]+T-1 (their positions too), attends
causally by slot, then advances each row by the tokens that were real (T, or fewer for a
right-padded prompt, whose padding slots later tokens overwrite). So rows of different lengths
batch without left padding, and a server's rows come and go independently.

`static=True` keeps every call's shapes the same (compiled decoding): rows move in lockstep and
attention spans all max_len slots, the unwritten ones masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError


@dataclass
class Step:
    """Where one forward call's tokens go. positions is None when rows are level (all at `start`)."""
    start: int
    positions: torch.Tensor | None   # (B, T) absolute positions of ragged rows, or (T,) when static
    mask: torch.Tensor | None         # bool, True = may attend; None: plain causal or (T == 1) all keys
    causal: bool


class LayerCache:
    """One layer's keys/values as one call writes and reads them."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, rows: int, step: Step, end: int, index=None):
        self.k, self.v, self.rows, self.end, self.index = k, v, rows, end, index
        self.start, self.positions = step.start, step.positions
        # static cache: the last slot each row may read, for attention that skips the masked tail
        self.last_slot = step.positions if step.positions is not None and step.positions.dim() == 1 else None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's (B, K, T, D) keys/values; return every slot attention may read."""
        B, T = k.shape[0], k.shape[2]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if self.last_slot is not None:  # static: fixed shapes, whole cache
            self.k.index_copy_(2, self.positions, k)
            self.v.index_copy_(2, self.positions, v)
            return self.k, self.v
        if self.index is None:  # level rows: one slice
            self.k[:B, :, self.start:self.start + T] = k
            self.v[:B, :, self.start:self.start + T] = v
        else:
            self.k[:B].scatter_(2, self.index, k)
            self.v[:B].scatter_(2, self.index, v)
        return self.k[:B, :, :self.end], self.v[:B, :, :self.end]


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None, static: bool = False):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        # zeros, not empty: masked slots still meet V in the weighted sum, and 0 * NaN would be NaN
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.lengths = [0] * batch_size   # on the host: shapes and masks need no device sync
        self.max_len, self.static = max_len, static
        self._step: tuple | None = None

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    def begin(self, rows: int, T: int) -> Step:
        """Plan a call writing T tokens to each of rows 0..rows-1 (the model calls this once per forward)."""
        if rows > self.batch_size:
            raise LlmkitError(f"{rows} rows exceed the KV cache's {self.batch_size}")
        lengths = self.lengths[:rows]
        start, end = lengths[0], max(lengths) + T
        level = min(lengths) == max(lengths)
        if end > self.max_len:
            raise LlmkitError(f"{end} tokens exceed the KV cache capacity of {self.max_len}")
        device = self.k[0].device if self.k else None
        index = None
        if self.static:
            if not level:
                raise LlmkitError("a static KV cache decodes its rows in lockstep")
            positions = torch.arange(start, start + T, device=device)
            step = Step(start, positions, torch.arange(self.max_len, device=device) <= positions[:, None], False)
            end = self.max_len
        elif level:  # level rows: slices, and masks only where SDPA's flags fall short
            step = Step(start, None, *self._level_mask(start, T, device))
        else:
            positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(T, device=device)
            mask = torch.arange(end, device=device) <= positions[:, :, None]  # (B, T, S): causal by slot
            step = Step(start, positions, mask[:, None], False)
            if self.k:
                index = positions[:, None, :, None].expand(rows, self.k[0].shape[1], T, self.k[0].shape[3])
        self._step = (rows, step, end, index)
        return step

    @staticmethod
    def _level_mask(start: int, T: int, device):
        if start == 0:
            return None, True
        if T == 1:
            return None, False
        slots = torch.arange(start + T, device=device)
        return slots <= slots[start:, None], False  # (T, S)

    def layer(self, i: int) -> LayerCache:
        rows, step, end, index = self._step
        return LayerCache(self.k[i], self.v[i], rows, step, end, index)

    def advance(self, counts: int | list[int]) -> None:
        """Rows 0..rows-1 of the last call keep `counts` tokens each (one count, or one per row)."""
        rows = self._step[0]
        counts = [counts] * rows if isinstance(counts, int) else counts
        for r, n in enumerate(counts):
            self.lengths[r] += n

    def reorder(self, index) -> None:
        """Keep rows `index` (in that order) as rows 0..len-1: beam search follows its beams."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.k[0].device if self.k else None)
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.lengths = [self.lengths[i] for i in index.tolist()]

    def copy_row(self, row: int, src: "KVCache", src_row: int, n: int) -> None:
        """Row `row` becomes the first n tokens of `src`'s row `src_row` (src may be this cache)."""
        for dst_t, src_t in zip(self.k + self.v, src.k + src.v):
            dst_t[row, :, :n] = src_t[src_row, :, :n]
        self.lengths[row] = n

    def resized(self, max_len: int) -> "KVCache":
        """A cache of max_len slots holding this one's rows (as far as they fit)."""
        k = self.k[0] if self.k else torch.zeros(0, 0, 0, 0)
        new = KVCache(len(self.k), self.batch_size, k.shape[1], max_len, k.shape[3], k.device, k.dtype, self.static)
        keep = min(max_len, self.max_len)
        for dst, src in zip(new.k + new.v, self.k + self.v):
            dst[:, :, :keep] = src[:, :, :keep]
        new.lengths = [min(n, max_len) for n in self.lengths]
        return new

    def reset(self) -> None:
        self.lengths = [0] * self.batch_size
