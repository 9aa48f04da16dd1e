"""Function calling (`tools`, `tool_choice`) as OpenAI's chat API has it.

The model sees the tools through its chat template when the template renders them (it mentions
`tools`), else as a system message that lists them and the reply format. A call is a JSON object
{"name": ..., "arguments": {...}}. With tool_choice "required" or a named function, decoding is
constrained by a grammar (infer/structured.py) to such an object whose arguments follow that
function's parameter schema; with "auto" the model may answer in text, and a reply that parses as
a call to a listed function becomes one; "none" leaves the tools out.

Streamed (CallStream), a constrained call goes out as OpenAI's deltas while it is generated: the
function's name once the model has written it, then the arguments piece by piece. An "auto" reply
streams as text as soon as it cannot be a call (it does not start with "{"); one that may be a call
is held until it ends, as only then is it known to parse as one.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from llmkit.errors import LlmkitError


@dataclass
class ToolPlan:
    tools: list[dict]          # OpenAI's function definitions
    schema: dict | None        # what the reply must be (None: free text, "auto")

    @property
    def names(self) -> set[str]:
        return {t["name"] for t in self.tools}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_schema(tool: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool["name"]},
                                             "arguments": tool.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def plan(tools, tool_choice) -> ToolPlan | None:
    """The request's tools and choice as a plan; None when no tool may be called."""
    functions = [t.function.model_dump(exclude_none=True) for t in tools or []]
    if not functions or tool_choice == "none":
        if isinstance(tool_choice, dict) or tool_choice == "required":
            raise LlmkitError("tool_choice asks for a tool call but no tools are given")
        return None
    if tool_choice is None or tool_choice == "auto":
        return ToolPlan(functions, None)
    if tool_choice == "required":
        schemas = [call_schema(f) for f in functions]
        return ToolPlan(functions, schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    wanted = tool_choice.function.name
    chosen = [f for f in functions if f["name"] == wanted]
    if not chosen:
        raise LlmkitError(f"tool_choice names function {wanted!r}, which is not among the tools")
    return ToolPlan(chosen, call_schema(chosen[0]))


def describe(tools: list[dict]) -> str:
    """A system message for templates that do not render tools themselves."""
    lines = ["You can call these functions:"]
    for t in tools:
        lines.append(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                 "parameters": t.get("parameters", {})}))
    lines.append('To call one, reply with only a JSON object: {"name": <function name>, "arguments": {...}}.')
    return "\n".join(lines)


def call_text(call) -> str:
    """An earlier assistant tool call as the model wrote it."""
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except ValueError:
        raise LlmkitError(f"tool call {call.id!r}: arguments is not JSON") from None
    return json.dumps({"name": call.function.name, "arguments": arguments})


def parse_call(text: str, plan_: ToolPlan) -> dict | None:
    """The reply as an OpenAI tool call, or None if it is not a call to a listed function."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(value, dict) and value.get("name") in plan_.names and isinstance(value.get("arguments"), dict)):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(value["arguments"])}}


# the start of a call, up to its arguments' first character
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """One choice's streamed reply under a tool plan, turned into OpenAI chat deltas."""

    def __init__(self, plan_: ToolPlan):
        self.plan, self.text = plan_, ""
        self.mode: str | None = None  # None: undecided, "text", or "call"
        self.sent = 0                 # characters of text already sent (as content or as arguments)
        self.spoke = False            # the role went out with the first delta

    def push(self, piece: str, final: bool) -> list[dict]:
        """The deltas for one more piece of reply text (`final`: the reply ended with it)."""
        self.text += piece
        deltas = []
        if self.mode is None:
            head = CALL_HEAD.match(self.text)
            if self.text.strip() and not self.text.lstrip().startswith("{"):
                self.mode = "text"
            elif self.plan.schema is not None and head and head.group(1) in self.plan.names:
                # decoding is constrained to a call: it is one, whatever its arguments turn out to be
                self.mode, self.sent = "call", head.end()
                deltas.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                               "function": {"name": head.group(1), "arguments": ""}}]})
            elif final:
                call = parse_call(self.text, self.plan)
                self.mode = "parsed" if call else "text"
                if call:
                    deltas.append({"tool_calls": [{"index": 0, **call}]})
        if self.mode == "text" and (len(self.text) > self.sent or not final):
            deltas.append({"content": self.text[self.sent:]})
            self.sent = len(self.text)
        elif self.mode == "call":
            end = len(self.text)
            if self.text.endswith("}"):  # perhaps the end of the call object, not of its arguments
                end -= 1
            if end > self.sent or (final and end < len(self.text)):
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": self.text[self.sent:end]}}]})
                self.sent = end
        if deltas and not self.spoke:
            deltas[0] = {"role": "assistant", **({"content": None} if self.mode != "text" else {}), **deltas[0]}
            self.spoke = True
        return deltas

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.mode in ("call", "parsed") else reason
