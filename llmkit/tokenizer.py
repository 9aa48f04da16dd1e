"""Tokenizers: a thin layer over Hugging Face `tokenizers`, plus chat templates.

Every tokenizer, trained here or imported, is stored as an HF `tokenizer.json`. The
special-token names and the Jinja chat template live beside it in
`tokenizer_config.json`, the way Hugging Face model directories keep them, so HF
directories load here and our directories load in `transformers`.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Iterable

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmkit.errors import LlmkitError
from llmkit.utils import atomic_open, atomic_path

TOKENIZER_FILE = "tokenizer.json"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
DEFAULT_SPECIALS = (BOS, EOS, PAD, *CHAT_TOKENS)
CHAT_ROLES = ("system", "user", "assistant", "tool")
# Tokens that close a turn or a document in the formats we train or import.
END_OF_TURN = ("<|end|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>",
               "<|endoftext|>", "<|end_of_text|>")
# Used only when a tokenizer.json comes without a tokenizer_config.json naming its specials.
GUESSES = {
    "bos": ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>"),
    "eos": ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
}

# One turn per message: <|role|>\ncontent<|end|>\n, then the assistant prompt.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ raise_exception('the default llmkit chat template has no tool role') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates want plain JSON, as transformers renders it.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise LlmkitError(f"invalid chat template: {e}") from None


def _token_content(value):
    """HF configs write special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> token ids, special tokens and chat formatting. The HF object is `.hf`."""

    def __init__(self, hf: HFTokenizer, bos=None, eos=None, pad=None, chat_template=None,
                 stop_tokens=None):
        self.hf = hf
        self.bos_token = self._as_token(bos, "bos")
        self.eos_token = self._as_token(eos, "eos")
        self.pad_token = self._as_token(pad, "pad")
        self.bos_id, self.eos_id, self.pad_id = (
            None if t is None else hf.token_to_id(t)
            for t in (self.bos_token, self.eos_token, self.pad_token))
        self.stop_tokens = [self._as_token(t, "stop") for t in (stop_tokens or ())]
        if chat_template is None and all(hf.token_to_id(t) is not None for t in CHAT_TOKENS):
            chat_template = DEFAULT_CHAT_TEMPLATE  # our own chat tokens: our own format
        self.chat_template = chat_template
        self._template = None if chat_template is None else _compile_template(chat_template)

    def _as_token(self, value, what: str) -> str | None:
        """Accept a token string or id; return the token string, checked against the vocab."""
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            token = self.hf.id_to_token(value)
            if token is None:
                raise LlmkitError(f"{what} token id {value} is outside the vocabulary")
            return token
        if isinstance(value, str) and self.hf.token_to_id(value) is not None:
            return value
        raise LlmkitError(f"{what} token {value!r} is not in the vocabulary")

    # ---- construction -------------------------------------------------------------

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int, special_tokens=None) -> Tokenizer:
        """Byte-level BPE (GPT-2 style) trained on a stream of texts; encodes any string."""
        specials = list(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
        minimum = 256 + len(specials)
        if vocab_size < minimum:
            raise LlmkitError(f"vocab size {vocab_size} is too small for byte-level BPE "
                              f"(256 bytes + {len(specials)} special tokens = {minimum})")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte, seen or not
        hf.train_from_iterator(texts, trainer)
        return cls._with_default_specials(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str], special_tokens=None) -> Tokenizer:
        """One token per character seen; unseen characters fall back to UTF-8 byte tokens.

        Stored as a BPE model without merges: ids 0..n_chars-1 are the sorted characters,
        then the special tokens, then the 256 `<0xNN>` byte tokens.
        """
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise LlmkitError("no text to train a character tokenizer on")
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        specials = list(DEFAULT_SPECIALS if special_tokens is None else special_tokens)
        for token in specials + [f"<0x{b:02X}>" for b in range(256)]:
            vocab.setdefault(token, len(vocab))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
        hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        hf.add_special_tokens(specials)
        return cls._with_default_specials(hf)

    @classmethod
    def _with_default_specials(cls, hf: HFTokenizer, **kwargs) -> Tokenizer:
        guess = {k: next((t for t in names if hf.token_to_id(t) is not None), None)
                 for k, names in GUESSES.items()}
        return cls(hf, **guess, **kwargs)

    @classmethod
    def from_hf(cls, hf_tokenizer: HFTokenizer, bos=None, eos=None, pad=None,
                chat_template=None, stop_tokens=None, *, bos_id=None, eos_id=None, pad_id=None,
                stop_ids=None) -> Tokenizer:
        """Wrap an HF tokenizer built elsewhere (GGUF or HF import).

        Specials may be given as token strings or ids; the `*_id` keywords are aliases.
        """
        if not isinstance(hf_tokenizer, HFTokenizer):
            raise LlmkitError(f"expected a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}")
        pick = lambda a, b: a if a is not None else b  # noqa: E731
        stops = [*(stop_tokens or ()), *(stop_ids or ())]
        return cls(hf_tokenizer, pick(bos, bos_id), pick(eos, eos_id), pick(pad, pad_id),
                   chat_template, stops)

    @classmethod
    def load(cls, path) -> Tokenizer:
        """Load a tokenizer.json (or a directory holding one) and its sibling config."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise LlmkitError(f"no tokenizer file at {file}")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises bare Exception for any parse error
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LlmkitError(f"corrupt tokenizer file {file}: {reason}") from None
        config_file = file.with_name(f"{file.stem}_config.json")
        if not config_file.is_file():
            return cls._with_default_specials(hf, chat_template=_read_jinja(file.parent))
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlmkitError(f"cannot read {config_file}: {e}") from None
        if not isinstance(config, dict):
            raise LlmkitError(f"{config_file} is not a JSON object")
        template = config.get("chat_template")
        if isinstance(template, list):  # older HF form: a list of named templates
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        template = template if isinstance(template, str) else _read_jinja(file.parent)
        try:
            return cls(hf, *(_token_content(config.get(f"{k}_token")) for k in ("bos", "eos", "pad")),
                       chat_template=template, stop_tokens=config.get("llmkit_stop_tokens"))
        except LlmkitError as e:
            raise LlmkitError(f"{config_file}: {e}") from None

    def save(self, path) -> Path:
        """Write tokenizer.json (or `path` itself if it ends in .json) and its config, atomically."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / TOKENIZER_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as tmp:
            self.hf.save(str(tmp))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,  # keep transformers' decode lossless too
            "llmkit_stop_tokens": self.stop_tokens,
        }
        with atomic_open(file.with_name(f"{file.stem}_config.json"), encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return file

    # ---- encoding -----------------------------------------------------------------

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            if self.bos_id is None:
                raise LlmkitError("this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise LlmkitError("this tokenizer has no EOS token")
            ids.append(self.eos_id)
        return ids

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise LlmkitError(f"can only encode str, got {type(text).__name__}")
        # add_special_tokens=False: BOS/EOS are ours to place, not an imported post-processor's.
        return self._wrap(self.hf.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False,
                     add_eos: bool = False) -> list[list[int]]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise LlmkitError("encode_batch expects a list of str")
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, id_: int) -> str | None:
        return self.hf.id_to_token(int(id_))

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: EOS, explicit stop tokens, and known end-of-turn tokens."""
        ids = {self.token_to_id(t) for t in (self.eos_token, *self.stop_tokens, *END_OF_TURN)
               if t is not None}
        ids.discard(None)
        return sorted(ids)

    # ---- chat ---------------------------------------------------------------------

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        """Render a conversation [{"role", "content"}, ...] to the prompt text the model expects;
        `tools` (OpenAI function definitions) reach templates that render them."""
        if self._template is None:
            raise LlmkitError("this tokenizer has no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise LlmkitError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise LlmkitError(f"message {i} is not a dict: {m!r}")
            if m.get("role") not in CHAT_ROLES:
                raise LlmkitError(f"message {i} has role {m.get('role')!r}; "
                                  f"expected one of {', '.join(CHAT_ROLES)}")
            if not isinstance(m.get("content"), str):
                raise LlmkitError(f"message {i} content must be a string, "
                                  f"got {type(m.get('content')).__name__}")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                pad_token=self.pad_token or "", tools=tools)
        except TemplateError as e:
            raise LlmkitError(f"chat template failed: {e}") from None

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={self.chat_template is not None})")


def _read_jinja(directory: Path) -> str | None:
    """Newer HF directories keep the chat template in its own chat_template.jinja file."""
    file = directory / "chat_template.jinja"
    try:
        return file.read_text(encoding="utf-8") if file.is_file() else None
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read {file}: {e}") from None
