"""Structured outputs: JSON that parses and follows a schema, by grammar-constrained decoding.

Before each sampling step a sequence's grammar state masks every token that cannot continue
valid JSON; after it the chosen token advances that state. Each sequence owns its state, so rows
of one batch follow different schemas (or none). The grammar engine is llguidance, chosen by
benchmarks/structured_overhead.py on SmolLM2's tokenizer: ~10 ms to compile a schema (xgrammar
~90 ms, outlines-core seconds), the lowest median per-token cost (~0.3 ms), and JSON Schema's
bounds enforced (outlines-core let `minimum: 0` through).
"""
from __future__ import annotations

import json
import threading
import weakref

import torch

from llmkit.errors import LlmkitError

# compact JSON: with free whitespace a weak model can pad with newlines until max_tokens
OPTIONS = {"whitespace_flexible": False}
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

    def apply(self, row: torch.Tensor) -> torch.Tensor:
        """Set the logits of tokens the grammar forbids next to -inf ((V,) float row, in place)."""
        self._lt.fill_next_token_bitmask(self.matcher, self.mask, 0)
        self._lt.apply_token_bitmask_inplace(row[None], self.mask)
        return row

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LlmkitError(f"grammar refused token {token}: {self.matcher.get_error()}")
