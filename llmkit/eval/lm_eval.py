"""EleutherAI lm-evaluation-harness support: `lm_eval --model llmkit --model_args path=...`.

    lm_eval --model llmkit --model_args path=runs/sft --tasks my_task --include_path my_tasks/ \\
        --device cpu --batch_size 8

lm-eval's own registry knows only its built-in models; the installed `llmkit_lm_eval_hook.pth`
registers this class under the name `llmkit` as soon as lm-eval loads its models, so the plain
`lm_eval` command finds it. From Python, importing this module registers it too, before
`lm_eval.simple_evaluate(model="llmkit", ...)`.

`path` is anything `llmkit.io.resolve.resolve_model` loads: an llmkit or Hugging Face directory, a
.gguf file or a short name such as smollm2-135m-instruct. Scoring reuses llmkit.eval.lm
(batched log-likelihood, rolling perplexity windows) and generation uses llmkit.infer.generate.
"""
from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from llmkit.errors import LlmkitError


@register_model("llmkit")
class LlmkitLM(TemplateLM):
    def __init__(self, path: str = "smollm2-135m-instruct", batch_size=8, device: str | None = None,
                 max_gen_toks: int = 256, dtype: str | None = None, **_ignored):
        super().__init__()
        import torch

        from llmkit.infer.cpu import optimize_for_inference
        from llmkit.io.resolve import resolve_model

        device = device or "auto"
        # lm-eval defaults to --device cuda; like its own HF backend, fall back to the CPU without one
        if device == "auto" or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = resolve_model(path, device=device, dtype=dtype)
        optimize_for_inference(self.model)
        self.path = str(path)
        # lm-eval passes "auto" or "auto:N" to ask for batch-size search; a fixed size is fine for us
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.eos_id, *tok.stop_ids, tok.bos_id):
            if candidate is not None:
                return candidate
        raise LlmkitError(f"{self.path}: the tokenizer has no EOS, end-of-turn or BOS token for lm-eval to use")

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from llmkit.eval.lm import loglikelihood

        results = loglikelihood(self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size)
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole text, every token scored once (EOT as first context)."""
        from llmkit.eval.lm import perplexity

        out = []
        for request in requests:
            (text,) = request.args
            tokens = [self.eot_token_id] + self.tok_encode(text)
            if len(tokens) < 2:
                out.append(0.0)
                continue
            scored = perplexity(self.model, tokens, batch_size=self.batch_size)
            total = -scored["loss"] * scored["tokens"]
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) completions, cut at the task's `until` strings."""
        from llmkit.infer.sampling import SamplingParams
        from llmkit.infer.generate import generate

        out = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = gen_kwargs.pop("do_sample", False)
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if sample else 0.0
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            room = self.max_length - len(self.tok_encode(context))
            if room < 1:
                raise LlmkitError(f"an lm-eval prompt of {len(self.tok_encode(context))} tokens fills the "
                                  f"model's context of {self.max_length}")
            params = SamplingParams(max_new_tokens=min(max_new, room), temperature=temperature,
                                    stop=tuple(u for u in until if u))
            text = generate(self.model, self.tokenizer, context, params)
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            out.append(text)
        return out

