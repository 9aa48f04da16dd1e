"""Supervised fine-tuning data: chat JSONL -> token sequences whose loss covers assistant turns only.

Each line of the input is {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}.
A conversation is rendered once with the tokenizer's chat template; the character spans of the
assistant turns are found by rendering growing prefixes of the conversation, and every token
that starts inside such a span (the reply and its end-of-turn marker) is a target. Everything
else (system prompt, user turns, role headers) has label -100 and costs no loss.

Batches come in two layouts:
  padding  one conversation per row, right-padded to the longest row of the batch. Attention is
           causal, so real tokens never see the padding after them and pad labels are -100: the
           result is exactly that of running each conversation alone.
  packing  conversations concatenated into rows of block_size + 1 tokens (none is split; a row is
           padded when the next one does not fit). Rows hold several conversations that can
           attend to each other, the usual price of packing for far fewer wasted positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.utils import read_jsonl

IGNORE = -100
ROLES = ("system", "user", "assistant")


def read_chats(path) -> list[list[dict]]:
    """Parse and validate a chat JSONL file; every problem names the file and line."""
    chats = []
    for number, record in read_jsonl(path, "chat data"):
        where = f"{path}:{number}"
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise LlmkitError(f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise LlmkitError(f"{where}: message {i} needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise LlmkitError(f"{where}: message {i} has unknown role {m['role']!r} "
                                  f"(expected {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise LlmkitError(f"{where}: message {i} content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise LlmkitError(f"{where}: conversation has no assistant turn, so nothing to learn")
        first = next(m["role"] for m in messages if m["role"] != "system")
        if first == "assistant":
            raise LlmkitError(f"{where}: conversation starts with an assistant turn; "
                              "a user message must come first")
        chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return chats


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        # Templates that rewrite earlier turns (e.g. strip reasoning) break the prefix property;
        # the assistant tokens then cannot be located reliably.
        if not (through.startswith(before) and text.startswith(through)):
            raise LlmkitError("the chat template does not render conversations incrementally; "
                              "cannot tell which tokens belong to assistant turns")
        spans.append((len(before), len(through)))
    return text, spans


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(token ids, labels): labels[i] = ids[i] for assistant tokens, IGNORE elsewhere."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    ids = list(encoding.ids)
    labels = [IGNORE] * len(ids)
    span = 0
    for i, (start, _) in enumerate(encoding.offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span < len(spans) and spans[span][0] <= start:
            labels[i] = ids[i]
    return ids, labels


@dataclass
class SFTData:
    """Encoded conversations, each (ids, labels) of at most max_tokens tokens, plus what was cut."""
    examples: list[tuple[list[int], list[int]]]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)


def encode_chats(tokenizer, chats: list[list[dict]], max_tokens: int, source="data") -> SFTData:
    """Encode conversations, truncating each to `max_tokens`; those left without a target are dropped."""
    examples, truncated, dropped, n_tokens, n_targets = [], 0, 0, 0, 0
    for messages in chats:
        ids, labels = encode_chat(tokenizer, messages)
        if len(ids) > max_tokens:
            truncated += 1
            ids, labels = ids[:max_tokens], labels[:max_tokens]
        targets = sum(1 for t in labels[1:] if t != IGNORE)  # position 0 is never predicted
        if targets == 0:
            dropped += 1
            continue
        examples.append((ids, labels))
        n_tokens += len(ids)
        n_targets += targets
    stats = {"conversations": len(chats), "truncated": truncated, "dropped": dropped,
             "examples": len(examples), "tokens": n_tokens, "target_tokens": n_targets,
             "max_tokens": max_tokens}
    if not examples:
        raise LlmkitError(f"{source}: no conversation keeps an assistant token within {max_tokens} tokens")
    return SFTData(examples, stats)


def load_sft_data(path, tokenizer, max_tokens: int) -> SFTData:
    return encode_chats(tokenizer, read_chats(path), max_tokens, source=path)


def describe(stats: dict) -> str:
    """One line for the log: how much was kept and what truncation cost."""
    line = (f"{stats['examples']} conversations, {stats['tokens']:,} tokens "
            f"({stats['target_tokens']:,} assistant targets)")
    if stats["truncated"] or stats["dropped"]:
        line += (f"; truncated {stats['truncated']} to {stats['max_tokens']} tokens, "
                 f"dropped {stats['dropped']} with no assistant token left")
    return line


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int = 0, width: int | None = None):
    """Right-padded (x, y, attention_mask): x = ids[:-1], y = labels[1:], mask True on real tokens."""
    width = width or max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, (ids, labels) in enumerate(examples):
        n = min(len(ids) - 1, width)
        x[row, :n] = torch.tensor(ids[:n])
        y[row, :n] = torch.tensor(labels[1:n + 1])
        mask[row, :n] = True
    return x, y, mask


def pack(examples: list[tuple[list[int], list[int]]], row_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Greedily concatenate whole examples (in the given order) into rows of <= row_tokens tokens."""
    rows, ids, labels = [], [], []
    for e_ids, e_labels in examples:
        if ids and len(ids) + len(e_ids) > row_tokens:
            rows.append((ids, labels))
            ids, labels = [], []
        ids, labels = ids + e_ids, labels + e_labels
    if ids:
        rows.append((ids, labels))
    return rows


class SFTSampler:
    """Endless, reshuffled-every-epoch batches of SFT examples for one rank, resumable exactly.

    Mirrors llmkit.data.corpus.RandomWindowSampler: next_batch() -> (x, y), state_dict(), load_state_dict().
    Each rank takes its own batch_size // world_size rows of every global batch.
    """

    def __init__(self, data: SFTData, block_size: int, batch_size: int, seed: int, pack_rows: bool = False,
                 pad_id: int = 0, rank: int = 0, world_size: int = 1):
        self.block_size, self.seed, self.pad_id = block_size, seed, pad_id
        self.pack_rows = pack_rows
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.batch_size = self.local_batch * world_size
        self.examples = data.examples
        self.epoch, self.cursor = 0, 0
        self._rows = self._epoch_rows()

    def _epoch_rows(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        shuffled = [self.examples[i] for i in order]
        rows = pack(shuffled, self.block_size + 1) if self.pack_rows else shuffled
        if len(rows) < self.batch_size:  # tiny data sets: repeat so a batch always fills
            rows = rows * -(-self.batch_size // len(rows))
        return rows

    @property
    def rows_per_epoch(self) -> int:
        """Rows (conversations, or packed rows) one pass over the data yields."""
        return len(self._rows)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > len(self._rows):  # drop the ragged tail of an epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._rows = self._epoch_rows()
        start = self.cursor + self.rank * self.local_batch
        batch = self._rows[start:start + self.local_batch]
        self.cursor += self.batch_size
        width = self.block_size if self.pack_rows else None
        x, y, _ = collate(batch, self.pad_id, width)
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self._rows = self._epoch_rows()


def eval_batches(data: SFTData, batch_size: int, pad_id: int = 0):
    """Every example once, in file order, as (x, y) batches: deterministic validation."""
    for i in range(0, len(data.examples), batch_size):
        x, y, _ = collate(data.examples[i:i + batch_size], pad_id)
        yield x, y
