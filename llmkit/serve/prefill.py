"""Prefill for sequences joining the batch: keys/values of their prompts and the logits of the
last prompt token, computed with as little repeated work as possible.

Prompts admitted together usually start alike (a chat template's system turn), so their common
prefix runs once; the rest of every prompt runs as one right-padded batch through
llmkit.infer.generate's Decoder.prefill, so the weights are read once for all newcomers instead of once
per prompt. The keys/values of the last prompt are kept: a later prompt that starts the same way
(the same system turn, or the next turn of that conversation) copies that part instead of
recomputing it.
"""
from __future__ import annotations

from llmkit.infer.generate import Decoder

MIN_SHARED_PREFIX = 4  # shorter shared prefixes are recomputed: copying them saves nothing


def common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    return next((i for i in range(limit) if a[i] != b[i]), limit)


class Prefiller:
    def __init__(self, model):
        self.model = model
        self._kept = None       # (token ids, (cache, row) holding their keys/values) of the last prompt
        self.reused_tokens = 0  # prompt tokens whose keys/values were copied instead of computed

    def reset(self) -> None:
        self._kept = None

    def __call__(self, prompts: list[list[int]]):
        """(logits (len(prompts), V) of each prompt's last token, sources): prompt i's keys/values
        are the first len(prompts[i]) slots of row sources[i][1] of KV cache sources[i][0]."""
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
        self._kept = (prompts[-1], sources[-1])
        return logits, sources

    def _fill_prefix(self, cache, ids: list[int]) -> None:
        """Keys/values of `ids` into slots 0..len(ids)-1 of every row of `cache`, copied as far as
        the kept prompt matches and computed (once, as one row) beyond that."""
        one = Decoder(self.model, 1, len(ids))
        if self._kept is not None:
            kept_ids, (kept_cache, kept_row) = self._kept
            reuse = common_prefix(kept_ids, ids)
            if reuse >= MIN_SHARED_PREFIX:
                one.cache.copy_row(0, kept_cache, kept_row, reuse)
                self.reused_tokens += reuse
        done = one.cache.lengths[0]
        if done < len(ids):
            one.prefill([ids[done:]])
        for row in range(cache.batch_size):
            cache.copy_row(row, one.cache, 0, len(ids))
        self.reused_tokens += len(ids) * (cache.batch_size - 1)
