"""The decode batch's KV cache: rows of different ages right-aligned at one shared write position.

The model's KVCache has a single write position P for the whole batch. Row r keeps its
sequence's `length` tokens in slots P-length..P-1 (earlier slots are dead and masked out
per row), so one decode step writes every row's new token at slot P. Live rows are
packed in rows 0..b-1. Moving all rows together keeps this layout as sequences come
and go: right when a newcomer is longer than P, left (compaction) when P reaches the
end of the cache or most slots are dead.
"""
from __future__ import annotations

import copy

INITIAL_SLOTS = 256  # cache length allocated first; it doubles on demand up to the context


class BatchCache:
    def __init__(self, model, max_batch: int, context: int):
        self.model, self.max_batch, self.context = model, max_batch, context
        self.cache = None  # allocated on first use

    @property
    def pos(self) -> int:
        return self.cache.pos

    def fit(self, lengths: list[int], joining: int = 0) -> None:
        """For live rows of these lengths: make P >= `joining` (a prompt about to be placed) and leave
        one free slot after P. Shift right for a long newcomer, compact when out of slots or mostly dead."""
        if self.cache is None:
            self._grow(joining + 1)
        live = max(lengths + [joining])
        dead = self.cache.pos - live
        if dead < 0:
            self._grow(live + 1)
            self._shift(-dead, len(lengths))
        elif self.cache.pos + 1 > self.cache.max_len or (dead > live and dead >= 64):
            self._shift(-dead, len(lengths))
        if self.cache.pos + 1 > self.cache.max_len:
            self._grow(self.cache.pos + 1)

    def place(self, row: int, pieces: list[tuple]) -> int:
        """Copy a prefilled sequence into `row`, ending at slot P. `pieces` are consecutive
        (source cache, source row, first slot, end slot) ranges; returns the sequence length."""
        n = sum(end - start for _, _, start, end in pieces)
        at = self.cache.pos - n
        for src, src_row, start, end in pieces:
            for dst_t, src_t in zip(self.cache.k + self.cache.v, src.k + src.v):
                dst_t[row, :, at:at + end - start] = src_t[src_row, :, start:end]
            at += end - start
        return n

    def move(self, src_row: int, dst_row: int, length: int) -> None:
        """Copy a row's live slots to another row (to fill the hole a leaving sequence left)."""
        pos = self.cache.pos
        for t in self.cache.k + self.cache.v:
            t[dst_row, :, pos - length:pos] = t[src_row, :, pos - length:pos]

    def view(self, rows: int):
        """The model's KVCache over the first `rows` rows: same storage, so the model's writes land here."""
        view = copy.copy(self.cache)
        view.k, view.v = [t[:rows] for t in self.cache.k], [t[:rows] for t in self.cache.v]
        view.batch_size = rows
        return view

    def idle(self) -> None:
        """No live rows: start over at slot 0, and give back a cache that a long request grew."""
        if self.cache is not None:
            self.cache.pos = 0
            if self.cache.max_len > INITIAL_SLOTS:
                self.cache = None

    def _shift(self, d: int, rows: int) -> None:
        """Move the first `rows` rows d slots right (d > 0) or left (d < 0); P moves with them."""
        if d == 0:
            return
        pos = self.cache.pos
        start = max(0, -d)  # slots before `start` would fall off the left edge: all dead by construction
        for t in self.cache.k + self.cache.v:
            t[:rows, :, start + d:pos + d] = t[:rows, :, start:pos].clone()
        self.cache.pos = pos + d

    def _grow(self, need: int) -> None:
        old = self.cache
        size = min(self.context, max(need, INITIAL_SLOTS, 2 * old.max_len if old is not None else 0))
        if old is not None and size <= old.max_len:
            return
        new = self.model.new_cache(self.max_batch, size)
        for t in new.k + new.v:
            t.zero_()  # masked slots must hold finite numbers: 0 * NaN would still poison attention
        if old is not None:
            for dst, src in zip(new.k + new.v, old.k + old.v):
                dst[:, :, :old.pos] = src[:, :, :old.pos]
            new.pos = old.pos
        self.cache = new
