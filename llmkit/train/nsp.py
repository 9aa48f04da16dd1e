"""Batches for BERT pretraining with next-sentence prediction (`--objective mlm+nsp`).

Each row is [CLS] A [SEP] B [SEP] cut from the token stream of the prepared documents: A is a random
window's first part (random length), and B is, with probability 1/2, the tokens that really follow A
(label 0, "is next"), otherwise as many tokens from a random other place (label 1). Then BERT's 15%
masking. Everything about the *global* batch is drawn from generators seeded alike on every rank, and
each rank keeps its rows (as llmkit's MaskedWindowSampler), so DDP and resume see what one process would.

The Trainer's batches are (x, y) pairs, so y packs the extra inputs: [mlm labels (T) | token types (T) | next (1)].
"""
from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.train.losses import mask_tokens

CLS_TOKENS, SEP_TOKENS = ("[CLS]", "<s>", "<|bos|>"), ("[SEP]", "</s>", "<|eos|>")


def boundary_ids(tokenizer) -> tuple[int, int]:
    """The ids of the [CLS]-like and [SEP]-like tokens this tokenizer has."""
    cls = next((i for i in map(tokenizer.token_to_id, CLS_TOKENS) if i is not None), None)
    sep = next((i for i in map(tokenizer.token_to_id, SEP_TOKENS) if i is not None), None)
    if cls is None or sep is None:
        raise LlmkitError(f"mlm+nsp needs a start token ({' or '.join(CLS_TOKENS)}) and a separator "
                          f"({' or '.join(SEP_TOKENS)}) in the tokenizer")
    return cls, sep


class NextSentenceSampler:
    def __init__(self, tokens, block_size: int, batch_size: int, cls_id: int, sep_id: int, mask_id: int,
                 vocab_size: int, special_ids, seed: int, rank: int = 0, world_size: int = 1):
        body = block_size - 3
        if body < 2 or len(tokens) < 2 * body + 1:
            raise LlmkitError(f"mlm+nsp needs block_size >= 5 and at least {2 * body + 1} tokens of data")
        self.tokens, self.body, self.batch_size = tokens, body, batch_size
        self.cls_id, self.sep_id, self.mask_id, self.vocab_size = cls_id, sep_id, mask_id, vocab_size
        self.special_ids, self.rank, self.world_size = list(special_ids), rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def _row(self, start: int, cut: int, random_start: int, is_random: bool):
        a = torch.as_tensor(self.tokens[start: start + cut].astype("int64"))
        b_from = random_start if is_random else start + cut
        b = torch.as_tensor(self.tokens[b_from: b_from + self.body - cut].astype("int64"))
        c, s = torch.tensor([self.cls_id]), torch.tensor([self.sep_id])
        ids = torch.cat([c, a, s, b, s])
        types = torch.cat([torch.zeros(len(a) + 2, dtype=torch.long), torch.ones(len(b) + 1, dtype=torch.long)])
        return ids, types

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, g = self.batch_size * self.world_size, self.generator
        starts = torch.randint(len(self.tokens) - self.body, (n,), generator=g).tolist()
        cuts = torch.randint(1, self.body, (n,), generator=g).tolist()
        others = torch.randint(len(self.tokens) - self.body, (n,), generator=g).tolist()
        is_random = (torch.rand(n, generator=g) < 0.5).tolist()
        rows = [self._row(*args) for args in zip(starts, cuts, others, is_random)]
        ids = torch.stack([r[0] for r in rows])
        types = torch.stack([r[1] for r in rows])
        inputs, labels = mask_tokens(ids, self.mask_id, self.vocab_size, self.special_ids, generator=g)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        nxt = torch.tensor(is_random, dtype=torch.long)[:, None]
        return inputs[mine], torch.cat([labels, types, nxt], dim=1)[mine]

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"])
