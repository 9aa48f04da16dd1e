"""Marian's tokenizers: SentencePiece models (source.spm, target.spm) numbered by a vocab.json.

Hugging Face Marian directories ship no tokenizer.json. Their text is cut into pieces by the
source language's SentencePiece model, and the pieces are numbered by vocab.json, one vocabulary
for both sides. This rebuilds that as one `tokenizers` Unigram model: vocab.json's pieces in id
order, scored as source.spm scores them, with source.spm's normalisation and its "▁" word marker.
Pieces only the target model knows are kept (decoding needs them) at a score no source
segmentation would pick where a source piece fits. Decoding joins pieces the way either SentencePiece model does.
"""
from __future__ import annotations

import json
from pathlib import Path

from llmkit.errors import LlmkitError

UNDERLINE = "▁"
# Far below any real piece's log-probability, per character: a target-only piece covers only what the
# source model has no piece for, one character at a time, as SentencePiece's unknown pieces do
# (Marian then looks their surface string up in vocab.json).
TARGET_ONLY_PENALTY = 1000.0


def read_spm(path: Path):
    """The SentencePiece ModelProto stored in `path`."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise LlmkitError("reading SentencePiece models needs the sentencepiece package: "
                          "pip install sentencepiece") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError has no stable import path
        raise LlmkitError(f"{path} is not a SentencePiece model ({type(e).__name__})") from None
    if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
        raise LlmkitError(f"{path}: only unigram SentencePiece models are supported (Marian's kind)")
    return proto


def _read_vocab(model_dir: Path) -> dict[str, int]:
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if config.get("separate_vocabs"):
        raise LlmkitError(f"{model_dir}: separate source and target vocabularies (separate_vocabs) are not "
                          "supported; llmkit's seq2seq models share one vocabulary")
    try:
        vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlmkitError(f"cannot read {model_dir / 'vocab.json'}: {e}") from None
    ids = sorted(vocab.values()) if isinstance(vocab, dict) else None
    if not ids or ids != list(range(len(ids))) or "<unk>" not in vocab:
        raise LlmkitError(f"{model_dir / 'vocab.json'}: expected {{piece: id}} with ids 0..n-1 and an <unk>")
    return vocab


def _normalizer(spec):
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # strip the ends, collapse inner runs of spaces
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    steps.append(normalizers.Replace(" ", UNDERLINE))
    if spec.add_dummy_prefix:  # SentencePiece marks the first word too, even one already marked
        steps.append(normalizers.Prepend(UNDERLINE))
    return normalizers.Sequence(steps)


def marian_tokenizer(model_dir):
    """An llmkit Tokenizer for a Marian directory holding source.spm, target.spm and vocab.json."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    from llmkit.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    vocab = _read_vocab(model_dir)
    source = read_spm(model_dir / "source.spm")
    scores = {p.piece: p.score for p in source.pieces if p.type in (p.NORMAL, p.USER_DEFINED)}
    floor = min(scores.values(), default=0.0)
    pieces = sorted(vocab, key=vocab.get)
    table = [(p, scores.get(p, floor - TARGET_ONLY_PENALTY * len(p))) for p in pieces]
    hf = HFTokenizer(models.Unigram(table, vocab["<unk>"], False))
    hf.normalizer = _normalizer(source.normalizer_spec)
    # no pre-tokenizer: SentencePiece segments the whole normalized text at once
    hf.decoder = decoders.Sequence([decoders.Replace(UNDERLINE, " "), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    # never cut: the control tokens, and multilingual models' ">>fr<<" target codes (which decode as text)
    hf.add_special_tokens([p for p in ("</s>", "<unk>", "<pad>") if p in vocab])
    hf.add_tokens([p for p in pieces if p.startswith(">>") and p.endswith("<<")])
    return Tokenizer.from_hf(hf, None, "</s>" if "</s>" in vocab else None, "<pad>" if "<pad>" in vocab else None)
