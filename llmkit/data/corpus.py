"""Corpus preparation and training-batch sampling.

`prepare` turns .txt/.jsonl files into flat token files the way nanoGPT does
(train.bin / val.bin, documents separated by EOS). Text streams through in pieces,
is encoded in batches and appended to disk, so memory stays bounded whatever the
corpus size. `RandomWindowSampler` draws random training windows from a split.
"""
from __future__ import annotations

import codecs
import glob
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.tokenizer import TOKENIZER_FILE, Tokenizer
from llmkit.utils import current_umask, progress

SUFFIXES = (".txt", ".jsonl")
META_FILE = "meta.json"
SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 18  # characters read at a time from a text file
BATCH_CHARS = 1 << 20  # characters handed to one encode_batch call
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def find_files(inputs: Iterable) -> list[Path]:
    """Expand inputs into .txt/.jsonl files; directories are searched recursively, sorted."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise LlmkitError(f"{path}: unsupported file type (expected .txt or .jsonl)")
            files.append(path)
        else:
            raise LlmkitError(f"no such file or directory: {path}")
    return files


def _cut_point(text: str) -> int:
    """Last index where `text` splits without changing its tokenization, or 0 if none.

    Byte-level BPE (GPT-2/Llama-3 style regexes) and character tokenizers start a new
    piece at a space that follows a non-space character, so encoding both halves
    gives exactly the ids of the whole. (SentencePiece tokenizers that prepend a
    space marker to every input may add one token per cut, every CHUNK_CHARS or so.)
    """
    i = len(text)
    while (i := text.rfind(" ", 0, i)) > 0:
        if not text[i - 1].isspace():
            return i
    return 0


def _text_pieces(path: Path, chunk_chars: int) -> Iterator[str]:
    """One .txt document as a stream of pieces cut at tokenization-neutral spaces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, fed = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_chars)
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                offset = fed - len(decoder.getstate()[0]) + e.start
                raise LlmkitError(f"{path}: not UTF-8 text (invalid byte at offset {offset})") from None
            fed += len(raw)
            if not raw:
                break
            cut = _cut_point(text)
            if cut == 0 and len(text) > 4 * chunk_chars:
                cut = len(text)  # no space anywhere: cut hard rather than hold it all in memory
            if cut:
                yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def _split_long(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut one long in-memory document into pieces the same way text files are cut."""
    start = 0
    while len(text) - start > chunk_chars:
        # Like _text_pieces: look further (up to 4 chunks) before cutting anywhere.
        window = text[start:start + 4 * chunk_chars]
        cut = _cut_point(window[:chunk_chars]) or _cut_point(window) or len(window)
        yield text[start:start + cut]
        start += cut
    if start < len(text):
        yield text[start:]


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LlmkitError(f"{path}:{lineno}: not UTF-8 text "
                                  f"(invalid byte at offset {offset + e.start})") from None
            offset += len(raw)
            if not line.strip():
                continue  # blank lines are not documents
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmkitError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LlmkitError(f'{path}:{lineno}: no "text" string field')
            yield record["text"]


def _pieces(files: list[Path], chunk_chars: int) -> Iterator[str | None]:
    """Every document as non-empty text pieces, each document followed by None."""
    for path in files:
        if path.suffix == ".jsonl":
            for doc in _jsonl_documents(path):
                yield from _split_long(doc, chunk_chars)
                yield None
        else:
            yield from _text_pieces(path, chunk_chars)
            yield None


def iter_texts(inputs, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Stream the text of `inputs` in pieces (for tokenizer training). Paths are checked now."""
    files = find_files(inputs)
    return (p for p in _pieces(files, chunk_chars) if p is not None)


def _batches(pieces: Iterator[str | None], batch_chars: int) -> Iterator[list[str | None]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece or "")
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def choose_dtype(vocab_size: int, dtype: str | None = None) -> str:
    """uint16 while every id fits (vocab <= 65536), else uint32; a requested dtype is checked."""
    if dtype is None:
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if dtype not in DTYPES:
        raise LlmkitError(f"unsupported token dtype {dtype!r} (use uint16 or uint32)")
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise LlmkitError(f"vocab size {vocab_size} does not fit in uint16 (max 65536); use uint32")
    return dtype


def _move_tail(src: Path, dst: Path, start_bytes: int) -> None:
    """Append src[start_bytes:] to dst and cut it from src, a block at a time."""
    with open(src, "r+b") as s, open(dst, "ab") as d:
        s.seek(start_bytes)
        while block := s.read(1 << 24):
            d.write(block)
        s.truncate(start_bytes)


def _write_splits(files, out: Path, tokenizer: Tokenizer, dtype: str, val_fraction: float,
                  seed: int, chunk_chars: int, batch_chars: int) -> dict:
    """Encode every document into out/train.bin or out/val.bin; return the counts."""
    np_dtype = DTYPES[dtype]
    eos = np.array([tokenizer.eos_id], dtype=np_dtype)
    rng = random.Random(seed)
    tokens = dict.fromkeys(SPLITS, 0)
    docs = dict.fromkeys(SPLITS, 0)
    last_start = dict.fromkeys(SPLITS, 0)  # where the latest document of each split begins
    n_docs, split = 0, None  # split: where the current document goes (None between documents)
    size = sum(Path(f).stat().st_size for f in files)
    with open(out / "train.bin", "wb") as train_f, open(out / "val.bin", "wb") as val_f, \
            progress(total=size, desc="prepare", unit="B", unit_scale=True) as bar:
        handles = {"train": train_f, "val": val_f}
        for batch in _batches(_pieces(files, chunk_chars), batch_chars):
            bar.update(sum(len(p) for p in batch if p is not None))  # characters: bytes for ASCII text
            encoded = iter(tokenizer.encode_batch([p for p in batch if p is not None]))
            for piece in batch:
                if piece is None:  # end of a document (skipped entirely if it had no text)
                    if split is not None:
                        eos.tofile(handles[split])
                        tokens[split] += 1
                    split = None
                    continue
                if split is None:  # first text of a new document: pick its split
                    # The first document always trains, so train is never empty.
                    split = "val" if n_docs and rng.random() < val_fraction else "train"
                    last_start[split] = tokens[split]
                    docs[split] += 1
                    n_docs += 1
                ids = np.asarray(next(encoded), dtype=np_dtype)
                ids.tofile(handles[split])
                tokens[split] += len(ids)
    if n_docs == 0:
        shown = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        raise LlmkitError(f"empty corpus: no text in {shown or 'the inputs (no .txt/.jsonl files)'}")
    itemsize = np.dtype(np_dtype).itemsize
    split_by = "documents"
    if n_docs == 1 and val_fraction > 0:
        # One document (say tinyshakespeare.txt): its last val_fraction of tokens is val, as nanoGPT.
        keep = int(tokens["train"] * (1 - val_fraction))
        _move_tail(out / "train.bin", out / "val.bin", keep * itemsize)
        tokens["val"], tokens["train"] = tokens["train"] - keep, keep
        docs["val"], split_by = 1, "tokens"
    elif docs["val"] == 0 and val_fraction > 0:
        # Chance gave val nothing: move the last training document over so val is never empty.
        _move_tail(out / "train.bin", out / "val.bin", last_start["train"] * itemsize)
        tokens["val"], tokens["train"] = tokens["train"] - last_start["train"], last_start["train"]
        docs["val"], docs["train"] = 1, docs["train"] - 1
    return {"documents": n_docs, "split_by": split_by,
            "train_tokens": tokens["train"], "val_tokens": tokens["val"],
            "train_documents": docs["train"], "val_documents": docs["val"]}


def prepare(inputs, out_dir, tokenizer, val_fraction: float = 0.1, seed: int = 0,
            dtype: str | None = None, chunk_chars: int = CHUNK_CHARS,
            batch_chars: int = BATCH_CHARS) -> dict:
    """Tokenize .txt/.jsonl files (or directories of them) into `out_dir`; return meta.json's dict.

    Each .txt file and each jsonl line is one document, followed by EOS. Documents go
    to val at random with probability `val_fraction` (the first always trains; if val
    ends up empty the last document moves there). A single-document corpus is split by
    tokens instead: its last `val_fraction` of tokens form val.
    """
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    if tokenizer.eos_id is None:
        raise LlmkitError("the tokenizer has no EOS token to separate documents")
    if not 0 <= val_fraction < 1:
        raise LlmkitError(f"val fraction must be in [0, 1), got {val_fraction}")
    if chunk_chars < 1 or batch_chars < 1:
        raise LlmkitError("chunk_chars and batch_chars must be positive")
    dtype = choose_dtype(tokenizer.vocab_size, dtype)
    files = find_files(inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LlmkitError(f"output {out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.tmp"):  # of an interrupted prepare
        shutil.rmtree(leftover, ignore_errors=True)
    # Build everything in a scratch directory beside out_dir; nothing lands until it is complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the data dir is the user's
        counts = _write_splits(files, tmp, tokenizer, dtype, val_fraction, seed,
                               chunk_chars, batch_chars)
        tokenizer.save(tmp / TOKENIZER_FILE)
        meta = {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
                **counts, "val_fraction": val_fraction, "seed": seed,
                "tokenizer": TOKENIZER_FILE, "sources": [str(f) for f in files]}
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        else:  # refresh file by file, meta.json last so it never describes missing data
            for name in sorted(os.listdir(tmp), key=lambda n: n == META_FILE):
                os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def load_meta(data_dir) -> dict:
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise LlmkitError(f"{data_dir} is not a prepared data directory (no {META_FILE}); "
                          "run `llmkit prepare` first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        dtype = meta["dtype"]
        if dtype not in DTYPES or not all(isinstance(meta[f"{s}_tokens"], int) for s in SPLITS):
            raise ValueError(f"bad dtype or token counts in {meta}")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise LlmkitError(f"corrupt {path}: {e}") from None
    return meta


def load_split(data_dir, split: str) -> np.ndarray:
    """Memory-map one split's tokens (an empty array if the split holds none)."""
    if split not in SPLITS:
        raise LlmkitError(f"unknown split {split!r} (use train or val)")
    meta = load_meta(data_dir)
    dtype, n = np.dtype(DTYPES[meta["dtype"]]), meta[f"{split}_tokens"]
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise LlmkitError(f"missing {path}")
    if path.stat().st_size != n * dtype.itemsize:
        raise LlmkitError(f"{path} holds {path.stat().st_size} bytes but {META_FILE} says "
                          f"{n} {meta['dtype']} tokens; re-run prepare")
    if n == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


class RandomWindowSampler:
    """nanoGPT-style batches: random windows of block_size+1 tokens, y = x shifted by one.

    Each step draws the offsets of the *global* batch (batch_size * world_size rows)
    from a generator seeded identically on every rank, and rank r keeps rows
    [r*batch_size, (r+1)*batch_size). So world_size ranks together see exactly the
    windows one process with the global batch would, and resuming from state_dict()
    replays the same future batches.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if block_size < 1 or batch_size < 1:
            raise LlmkitError(f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}")
        if not 0 <= rank < world_size:
            raise LlmkitError(f"rank {rank} is outside world_size {world_size}")
        if len(tokens) < block_size + 1:
            raise LlmkitError(f"split has {len(tokens)} tokens, fewer than block_size+1 = "
                              f"{block_size + 1}; use more data or a smaller block size")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self._span = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size,
                               (self.batch_size * self.world_size,), generator=self.generator)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].numpy()
        windows = np.asarray(self.tokens[mine[:, None] + self._span]).astype(np.int64)
        self.steps += 1
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps": self.steps, "seed": self.seed,
                "block_size": self.block_size, "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))
        except (KeyError, TypeError, RuntimeError) as e:
            raise LlmkitError(f"invalid sampler state: {e}") from None
        self.steps = int(state.get("steps", 0))
