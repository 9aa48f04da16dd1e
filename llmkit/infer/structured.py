"""Structured outputs: JSON that parses and follows a schema, by grammar-constrained decoding.

Before each sampling step a sequence's grammar state masks every token that cannot continue
valid JSON; after it the chosen token advances that state. Each sequence owns its state, so rows
of one batch follow different schemas (or none). The grammar engine is llguidance, chosen by
benchmarks/structured_overhead.py on SmolLM2's tokenizer: ~10 ms to compile a schema (xgrammar
~90 ms, outlines-core seconds), the lowest median per-token cost (~0.3 ms), and JSON Schema's
bounds enforced (outlines-core let `minimum: 0` through).

A reply must also end within max_tokens: before a constrained row takes a token, the row checks
that the JSON can still be closed in the tokens left after it (a greedy closing path: close the
string, the array, the object, fill required fields with the shortest values). When it could not,
the row follows that path instead, so its reply is valid JSON, cut short; the engine reports such a
reply with finish_reason "length", as OpenAI does for a reply that ran out of tokens.
"""
from __future__ import annotations

import json
import threading
import weakref

import torch

from llmkit.errors import LlmkitError

# compact JSON: with free whitespace a weak model can pad with newlines until max_tokens
OPTIONS = {"whitespace_flexible": False}
# tokens a closing path tries first, in order, inside a string and outside one (where '"' opens a
# string and '}' inside one is just a character): those that end strings, arrays and objects
# (combined ones first, as they close two things with one token), then the shortest values;
# "," before "0", so that a number ends instead of growing
CLOSERS = {True: ('"}', '"]', '"'), False: ('}}', ']}', '}', ']', ',', '0', '"', '[', '{', ':')}
_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def json_grammar(schema: dict | None) -> str:
    """llguidance's grammar for JSON following `schema` (None: any JSON object, OpenAI's json_object)."""
    import llguidance

    schema = {"type": "object"} if schema is None else schema
    if not isinstance(schema, dict):
        raise LlmkitError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=OPTIONS)
    except Exception as e:  # the library's own error types; the schema is user input
        raise LlmkitError(f"the JSON schema cannot be used: {e}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise LlmkitError(f"the JSON schema cannot be used: {messages[0]}")
    return grammar


def grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of `tokenizer` (built once per tokenizer: about a second)."""
    import llguidance

    with _lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None or cached[0] != vocab_size:
            eos = list(tokenizer.stop_ids) or None
            built = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=eos, slices=[])
            # the first matcher and mask build llguidance's lazy tables (seconds): pay that here, once,
            # not inside a decode step that other requests wait on
            Constraint(built, vocab_size, json_grammar(None)).apply(torch.zeros(vocab_size))
            cached = _tokenizers[tokenizer] = (vocab_size, built)
        return cached[1]


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str):
        """`tokenizer`: an llmkit Tokenizer or llguidance's view of one."""
        import llguidance
        import llguidance.torch as lt

        self._lt = lt
        if not isinstance(tokenizer, llguidance.LLTokenizer):
            tokenizer = grammar_tokenizer(tokenizer, vocab_size)
        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.mask = lt.allocate_token_bitmask(1, vocab_size)
        self.tokenizer = tokenizer
        self.closers = {inside: [ids[0] for ids in map(tokenizer.tokenize_str, texts) if len(ids) == 1]
                        for inside, texts in CLOSERS.items()}
        self.closing: list[int] = []  # the rest of the closing path once the row follows it
        self.cut = False              # the reply was closed early, to fit max_tokens
        self.lexer = (False, False)   # (inside a string, after a backslash) at the end of the text so far

    def apply(self, row: torch.Tensor) -> torch.Tensor:
        """Set the logits of tokens the grammar forbids next to -inf ((V,) float row, in place)."""
        self._lt.fill_next_token_bitmask(self.matcher, self.mask, 0)
        self._lt.apply_token_bitmask_inplace(row[None], self.mask)
        return row

    def fit(self, token: int, budget: int) -> int:
        """`token` (sampled under apply's mask) if the JSON can still close in the budget - 1 tokens
        after it, else the next token of a path closing it within `budget` (this one included)."""
        if self.closing:
            return self.closing.pop(0)
        if self.matcher.is_accepting() or self.matcher.is_stopped():
            return token  # the JSON is complete: only the end of text is left
        trial = self.matcher.deep_copy()
        if (trial.try_consume_tokens([token]) == 1
                and self._closing_path(trial, self._scan(self.lexer, token), budget - 1) is not None):
            return token
        path = self._closing_path(self.matcher.deep_copy(), self.lexer, budget)
        if not path:  # no closing path this short: the reply runs out of tokens unclosed
            return token
        self.cut, self.closing = True, path[1:]
        return path[0]

    def _closing_path(self, matcher, lexer: tuple, limit: int) -> list[int] | None:
        """Tokens taking `matcher` (consumed along the way) to the end of the JSON, at most `limit`."""
        path: list[int] = []
        while not matcher.is_accepting():
            if len(path) >= limit:
                return None
            forced = matcher.compute_ff_tokens()  # what the grammar allows only one way (a key), as tokens
            if forced and matcher.try_consume_tokens(forced) == len(forced):
                path += forced
                for token in forced:
                    lexer = self._scan(lexer, token)
                continue
            token = next((t for t in self.closers[lexer[0]] if matcher.try_consume_tokens([t]) == 1), None)
            if token is None:  # nothing that closes fits here (a minLength, an enum): the lowest allowed token
                token = self._lowest_allowed(matcher)
                if token is None or matcher.try_consume_tokens([token]) != 1:
                    return None
            path.append(token)
            lexer = self._scan(lexer, token)
        return path if len(path) <= limit else None

    def _scan(self, lexer: tuple, token: int) -> tuple:
        """The lexer state (inside a string, after a backslash) after the text of `token`."""
        inside, escaped = lexer
        for byte in self.tokenizer.decode_bytes([token]):
            if escaped:
                escaped = False
            elif inside and byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # double quote
                inside = not inside
        return inside, escaped

    def _lowest_allowed(self, matcher) -> int | None:
        self._lt.fill_next_token_bitmask(matcher, self.mask, 0)
        words = self.mask[0].nonzero()
        if not len(words):
            return None
        word = int(self.mask[0, words[0, 0]]) & 0xFFFFFFFF
        return int(words[0, 0]) * 32 + (word & -word).bit_length() - 1

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LlmkitError(f"grammar refused token {token}: {self.matcher.get_error()}")
        self.lexer = self._scan(self.lexer, token)
