"""Multi-turn chat over `llmkit.infer.generate.stream`, rendered with the model's own chat template.

`ChatSession` keeps the message history and turns each user message into a streamed reply;
generation ends on the model's end-of-turn token (the tokenizer's stop ids). `chat_loop` is the
interactive `llmkit chat` prompt; `ask` is the one-question library call the demo uses.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator

from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.generate import stream

# SmolLM2's model card samples at temperature 0.2, top-p 0.9; small models ramble when hotter.
DEFAULT_CHAT_PARAMS = dict(max_new_tokens=256, temperature=0.2, top_p=0.9)
HELP = "commands: /reset clears the history, /exit (or Ctrl-D) quits"


class ChatSession:
    """A conversation with one model: history of {role, content} messages plus sampling settings."""

    def __init__(self, model, tokenizer, system: str | None = None, params: SamplingParams | None = None):
        if tokenizer.chat_template is None:
            raise LlmkitError("this model's tokenizer has no chat template; use `llmkit generate` instead")
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.params = params or SamplingParams(**DEFAULT_CHAT_PARAMS)
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self) -> str:
        """The chat-template text for the history, ending with the assistant's turn opening.

        When the conversation outgrows the model's context, the oldest exchanges are dropped
        (the system message is kept) until the prompt plus the reply budget fits."""
        # Reserve the reply's room, but at most half the context: a 64-token model with the default
        # 256-token replies still chats (generation then answers in what is left).
        context = self.model.config.block_size
        budget = context - min(self.params.max_new_tokens, context // 2)
        kept = list(self.messages)
        while True:
            text = self.tokenizer.apply_chat_template(kept, add_generation_prompt=True)
            if len(self.tokenizer.encode(text)) <= budget:
                return text
            first = 1 if kept and kept[0]["role"] == "system" else 0
            if len(kept) - first <= 1:
                raise LlmkitError(f"the message does not fit in the model's context of "
                                  f"{self.model.config.block_size} tokens with max_new_tokens="
                                  f"{self.params.max_new_tokens}")
            del kept[first:first + 2]  # one user message and the reply to it

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history when streaming ends
        (also when the caller stops early, e.g. on Ctrl-C, with the part produced so far)."""
        self.messages.append({"role": "user", "content": text})
        try:
            prompt = self.prompt()
        except LlmkitError:
            self.messages.pop()
            raise
        pieces: list[str] = []
        try:
            for piece in stream(self.model, self.tokenizer, prompt, self.params):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def reply(self, text: str) -> str:
        """The whole reply to one user message."""
        return "".join(self.send(text))


def chat_loop(session: ChatSession, input_fn=input, out=sys.stdout) -> None:
    """Read messages until /exit or end of input; stream each reply as it is generated."""
    if input_fn is input:
        try:
            import readline  # noqa: F401  (line editing and history for input(), where available)
        except ImportError:
            pass
    print(HELP, file=out)
    while True:
        try:
            line = input_fn("> ")
        except EOFError:
            print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=out)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {HELP}", file=out)
            continue
        try:
            for piece in session.send(line):
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:  # stop this reply, keep chatting
            out.write(" [interrupted]")
        except LlmkitError as e:  # e.g. a message longer than the context: say so, keep chatting
            out.write(f"error: {e}")
        out.write("\n")
        out.flush()


def ask(question: str, model="smollm2-135m-instruct", tokenizer=None, system: str | None = None,
        out=sys.stdout, **sampling) -> str:
    """Ask one question through the chat template, streaming the answer to `out`; return the answer.

    `model` is anything `resolve_model` accepts, or a loaded model (then pass its `tokenizer`).
    Sampling keywords are SamplingParams fields; by default the answer is greedy (reproducible).
    """
    if tokenizer is None:
        from llmkit.infer.cpu import optimize_for_inference
        from llmkit.io.resolve import resolve_model
        model, tokenizer = resolve_model(model)
        optimize_for_inference(model, single_row=True)
    params = SamplingParams(**{"max_new_tokens": 256, "temperature": 0.0, **sampling})
    session = ChatSession(model, tokenizer, system=system, params=params)
    pieces = []
    for piece in session.send(question):
        pieces.append(piece)
        if out is not None:
            out.write(piece)
            out.flush()
    if out is not None:
        out.write("\n")
    return "".join(pieces).strip()
