"""llmkit: a complete, hackable LLM toolkit on PyTorch.

The package is laid out by pipeline stage: data/ -> model/ -> train/ -> infer/ -> eval/, with io/ for
weights in and out and serve/ for the HTTP server. The names below are imported on first use
(PEP 562), so `import llmkit` and `llmkit --help` do not load torch and every stage up front.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LlmkitError": "llmkit.errors",
    "Tokenizer": "llmkit.tokenizer",
    "PRESETS": "llmkit.model.config", "ModelConfig": "llmkit.model.config", "preset": "llmkit.model.config",
    "GPT": "llmkit.model.decoder",
    "Encoder": "llmkit.model.encoder", "EncoderConfig": "llmkit.model.encoder",
    "RandomWindowSampler": "llmkit.data.corpus", "load_split": "llmkit.data.corpus", "prepare": "llmkit.data.corpus",
    "Trainer": "llmkit.train.trainer", "TrainConfig": "llmkit.train.trainer",
    "finetune": "llmkit.train.tasks",
    "SamplingParams": "llmkit.infer.sampling", "generate": "llmkit.infer.generate", "stream": "llmkit.infer.generate",
    "sample_next": "llmkit.infer.sampling", "apply_repetition_penalty": "llmkit.infer.sampling",
    "top_k_filter": "llmkit.infer.sampling", "top_p_filter": "llmkit.infer.sampling",
    "ChatSession": "llmkit.infer.chat", "ask": "llmkit.infer.chat",
    "embed_texts": "llmkit.infer.embed",
    "perplexity": "llmkit.eval.lm",
    "DEFAULT_MODEL": "llmkit.io.resolve", "convert": "llmkit.io.resolve", "resolve_model": "llmkit.io.resolve",
    "load_encoder": "llmkit.io.encoders", "save_encoder": "llmkit.io.encoders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
