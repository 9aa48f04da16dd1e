"""Prefill for sequences joining the batch: keys/values of their prompts and the logits of the
last prompt token, computed with as little repeated work as possible.

Prompts admitted together usually start alike (a chat template's system turn), so their common
prefix runs once; the rest of every prompt runs as one right-padded batch through
llmkit.infer.generate's Decoder.prefill, so the weights are read once for all newcomers instead of once
per prompt. The keys/values of recent sequences are kept: the last prompt prefilled, and every
finished reply with its prompt (the engine hands them over as they end). A later prompt that
starts the same way (the same system turn, or the next turn of that conversation, which repeats
the previous prompt and reply) copies the longest matching part instead of recomputing it.
"""
from __future__ import annotations

from llmkit.infer.generate import Decoder

MIN_SHARED_PREFIX = 4  # shorter shared prefixes are recomputed: copying them saves nothing
KEPT = 8               # sequences whose keys/values are kept for reuse, the least recently used dropped


def common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    return next((i for i in range(limit) if a[i] != b[i]), limit)


class Prefiller:
    def __init__(self, model):
        self.model = model
        # (token ids, (cache, row) holding their keys/values): finished sequences, copied out of the
        # engine's cache, and the last prompt prefilled (its prefill cache, not copied)
        self._kept: list[tuple[list[int], tuple]] = []
        self._last: tuple[list[int], tuple] | None = None
        self.reused_tokens = 0  # prompt tokens whose keys/values were copied instead of computed

    def reset(self) -> None:
        self._kept, self._last = [], None

    def keep(self, ids: list[int], cache, row: int) -> None:
        """Keep the keys/values of `ids` (the first len(ids) slots of `cache`'s row `row`), copied:
        the engine reuses that row. A kept sequence that `ids` extends is dropped, as it adds nothing."""
        if len(ids) < MIN_SHARED_PREFIX:
            return
        own = self.model.new_cache(1, len(ids))
        own.copy_row(0, cache, row, len(ids))
        self._kept = [k for k in self._kept if common_prefix(k[0], ids) < len(k[0])][-(KEPT - 1):]
        self._kept.append((ids, (own, 0)))

    def _best(self, ids: list[int]) -> tuple[int, tuple | None]:
        """(tokens, source) of the kept sequence sharing the longest prefix with `ids`."""
        best, source, used = 0, None, None
        for i, (kept_ids, kept_source) in enumerate(self._kept + [self._last] * (self._last is not None)):
            n = common_prefix(kept_ids, ids)
            if n > best:
                best, source, used = n, kept_source, i
        if used is not None and used < len(self._kept):  # most recently used last: dropped last
            self._kept.append(self._kept.pop(used))
        return best, source

    def __call__(self, prompts: list[list[int]]):
        """(logits (len(prompts), V) of each prompt's last token, sources): prompt i's keys/values
        are the first len(prompts[i]) slots of row sources[i][1] of KV cache sources[i][0]."""
        if len(prompts) == 1:
            return self._one(prompts[0])
        shared = min(len(p) for p in prompts) - 1  # each prompt's last token always runs: its logits
        for p in prompts[1:]:
            shared = min(shared, common_prefix(prompts[0], p))
        if len(prompts) > 1 and shared < MIN_SHARED_PREFIX:
            shared = 0
        suffixes = [p[shared:] for p in prompts]
        decoder = Decoder(self.model, len(prompts), shared + max(len(s) for s in suffixes))
        if shared:
            self._fill_prefix(decoder.cache, prompts[0][:shared])
        logits = decoder.prefill(suffixes)
        sources = [(decoder.cache, i) for i in range(len(prompts))]
        self._last = (prompts[-1], sources[-1])
        return logits, sources

    def _one(self, ids: list[int]):
        """One prompt (a chat's next turn): the kept prefix copied straight into its row, the rest
        in one forward pass."""
        decoder = Decoder(self.model, 1, len(ids))
        reuse, source = self._best(ids[:-1])  # the last token always runs: its logits
        if reuse >= MIN_SHARED_PREFIX:
            decoder.cache.copy_row(0, *source, reuse)
            self.reused_tokens += reuse
        logits = decoder.prefill([ids[decoder.cache.lengths[0]:]])
        self._last = (ids, (decoder.cache, 0))
        return logits, [(decoder.cache, 0)]

    def _fill_prefix(self, cache, ids: list[int]) -> None:
        """Keys/values of `ids` into slots 0..len(ids)-1 of every row of `cache`, copied as far as
        a kept sequence matches and computed (once, as one row) beyond that."""
        one = Decoder(self.model, 1, len(ids))
        reuse, source = self._best(ids)
        if reuse >= MIN_SHARED_PREFIX:
            one.cache.copy_row(0, *source, reuse)
            self.reused_tokens += reuse
        done = one.cache.lengths[0]
        if done < len(ids):
            one.prefill([ids[done:]])
        for row in range(cache.batch_size):
            cache.copy_row(row, one.cache, 0, len(ids))
        self.reused_tokens += len(ids) * (cache.batch_size - 1)
