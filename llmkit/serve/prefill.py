"""Prefill for sequences joining the batch: keys/values of their prompts and the logits of the
last prompt token, computed with as little repeated work as possible.

Prompts admitted together usually start alike (a chat template's system turn), so their common
prefix runs once; the rest of every prompt runs in one left-padded batch, so the weights are read
once for all newcomers instead of once per prompt. The keys/values of the last prompt are kept:
a later prompt that starts the same way (the same system turn, or the next turn of that
conversation) copies that part instead of recomputing it.
"""
from __future__ import annotations

import torch

MIN_SHARED_PREFIX = 4  # shorter shared prefixes are recomputed: copying them saves nothing


def common_prefix(a: list[int], b: list[int]) -> int:
    limit = min(len(a), len(b))
    return next((i for i in range(limit) if a[i] != b[i]), limit)


def copy_pieces(dst, row: int, pieces: list[tuple], upto: int) -> None:
    """Write the first `upto` tokens that `pieces` ((cache, row, first slot, end slot) ranges, in
    order) hold into slots 0..upto-1 of `dst`'s row."""
    at = 0
    for src, src_row, start, end in pieces:
        take = min(end - start, upto - at)
        if take <= 0:
            continue
        for dst_t, src_t in zip(dst.k + dst.v, src.k + src.v):
            dst_t[row, :, at:at + take] = src_t[src_row, :, start:start + take]
        at += take


class Prefiller:
    def __init__(self, model):
        self.model = model
        self._kept = None       # (token ids, pieces holding their keys/values) of the last prompt
        self.reused_tokens = 0  # prompt tokens whose keys/values were copied instead of computed

    def reset(self) -> None:
        self._kept = None

    def __call__(self, prompts: list[list[int]]):
        """(logits (len(prompts), V) of each prompt's last token, pieces per prompt). A prompt's
        pieces are (cache, row, first slot, end slot) ranges holding its keys/values in order."""
        shared = min(len(p) for p in prompts) - 1  # each prompt's last token always runs: its logits
        for p in prompts[1:]:
            shared = min(shared, common_prefix(prompts[0], p))
        if len(prompts) > 1 and shared < MIN_SHARED_PREFIX:
            shared = 0
        suffixes = [p[shared:] for p in prompts]
        width = max(len(s) for s in suffixes)
        batch = self.model.new_cache(len(prompts), shared + width)
        if shared:
            self._fill_prefix(batch, prompts[0][:shared])
        pad = torch.tensor([width - len(s) for s in suffixes])
        idx = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, s in enumerate(suffixes):
            idx[i, width - len(s):] = torch.tensor(s)
        positions = mask = None
        if bool(pad.any()):  # left padding: per-row positions, and pad slots masked out as keys
            positions = shared + (torch.arange(width)[None, :] - pad[:, None]).clamp(min=0)
            mask = torch.ones(len(prompts), shared + width, dtype=torch.bool)
            mask[:, shared:] = torch.arange(width)[None, :] >= pad[:, None]
        logits, _ = self.model(idx, cache=batch, positions=positions, attn_mask=mask, last_only=True)
        pieces = [[(batch, i, 0, shared), (batch, i, shared + int(pad[i]), shared + width)]
                  for i in range(len(prompts))]
        self._kept = (prompts[-1], pieces[-1])
        return logits[:, -1], pieces

    def _fill_prefix(self, batch, ids: list[int]) -> None:
        """Keys/values of `ids` into slots 0..len(ids)-1 of every row of `batch`, copied as far as
        the kept prompt matches and computed (once, as one row) beyond that."""
        one = self.model.new_cache(1, len(ids))
        if self._kept is not None:
            kept_ids, kept_pieces = self._kept
            reuse = common_prefix(kept_ids, ids)
            if reuse >= MIN_SHARED_PREFIX:
                copy_pieces(one, 0, kept_pieces, reuse)
                one.pos = reuse
                self.reused_tokens += reuse
        if one.pos < len(ids):
            self.model(torch.tensor([ids[one.pos:]]), cache=one, last_only=True)
        for dst, src in zip(batch.k + batch.v, one.k + one.v):
            dst[:, :, :len(ids)] = src[0, :, :len(ids)]
        batch.pos = len(ids)
        self.reused_tokens += len(ids) * (batch.batch_size - 1)
