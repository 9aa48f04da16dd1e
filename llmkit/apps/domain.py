"""A dialogue domain file (YAML), read and checked against the NLU model that will serve it.

    name: restaurant booking
    slots:                         # every slot the domain knows, with the question that asks for it
      people: {prompt: "For how many people?"}
    intents:                       # the tasks users can ask for
      book_table:
        slots: [people, day, time, name]      # what this task understands
        required: [people, day, time]          # what it needs before it can run
        confirm: "A table for {people} on {day} at {time}. Shall I book it?"
        action: book_table                     # the action run once the user confirms
        done: "Your table for {people} on {day} at {time} is booked."
    acts:                          # NLU intents with a dialogue meaning (each optional)
      inform: inform               # gives slot values only
      affirm: affirm
      deny: deny
      cancel: cancel
      greet: greet
    replies: {greet: ..., cancelled: ..., fallback: ..., ask_change: ..., nothing_to_confirm: ...}
    reply: template                # or chat: the chat model words each reply (`dialog`, and `serve`'s /v1/dialog)
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.errors import LlmkitError
from llmkit.utils import check_mapping, read_yaml

ACTS = ("inform", "affirm", "deny", "cancel", "greet")
REPLY_KINDS = ("template", "chat")
DEFAULT_REPLIES = {
    "greet": "Hello! How can I help?",
    "cancelled": "Cancelled. Anything else?",
    "fallback": "Sorry, I did not understand that.",
    "ask_change": "What should I change?",
    "nothing_to_confirm": "There is nothing to confirm yet.",
}


@dataclass
class Task:
    name: str
    slots: list[str]
    required: list[str]
    confirm: str
    action: str
    done: str


@dataclass
class Domain:
    name: str
    prompts: dict[str, str]                      # slot -> question asking for it
    tasks: dict[str, Task]
    acts: dict[str, str] = field(default_factory=dict)   # act -> NLU intent name
    replies: dict[str, str] = field(default_factory=dict)
    reply: str = "template"                      # who words the replies: the templates, or the chat model

    def act_of(self, intent: str | None) -> str | None:
        return next((act for act, name in self.acts.items() if name == intent), None)

    def check_nlu(self, intents: list[str], slot_types: list[str], where: str = "the NLU model") -> None:
        """Every intent and slot the domain names must be one the NLU model predicts."""
        known = set(intents)
        for intent in [*self.tasks, *self.acts.values()]:
            if intent not in known:
                raise LlmkitError(f"domain {self.name!r}: unknown intent {intent!r}: {where} predicts "
                                  f"{', '.join(sorted(known))}")
        for slot in self.prompts:
            if slot not in slot_types:
                raise LlmkitError(f"domain {self.name!r}: unknown slot {slot!r}: {where} tags "
                                  f"{', '.join(slot_types) or 'no slots'}")


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _str_list(value, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LlmkitError(f"{where} must be a list of names")
    return value


def _task(name: str, spec, prompts: dict, where: str) -> Task:
    spec = check_mapping(spec, f"{where}: intent {name!r}", {"slots", "required", "confirm", "action", "done"})
    slots = _str_list(spec.get("slots", []), f"{where}: intent {name!r} slots")
    required = _str_list(spec.get("required", slots), f"{where}: intent {name!r} required")
    for slot in [*slots, *required]:
        if slot not in prompts:
            raise LlmkitError(f"{where}: intent {name!r} uses unknown slot {slot!r} (slots: {', '.join(prompts)})")
        if slot not in slots:
            raise LlmkitError(f"{where}: intent {name!r} requires slot {slot!r} that is not among its slots")
    task = Task(name, slots, required, str(spec.get("confirm", "Shall I go ahead?")), str(spec.get("action", name)),
                str(spec.get("done", "Done.")))
    for what in ("confirm", "done"):
        extra = sorted(_fields(getattr(task, what)) - set(required))
        if extra:  # only required slots are sure to have a value when these are said
            raise LlmkitError(f"{where}: intent {name!r} {what} template uses {{{extra[0]}}}, not a required slot")
    return task


def load_domain(path) -> Domain:
    """Parse and check a domain file; every problem is one LlmkitError naming the file."""
    path = Path(path)
    raw = read_yaml(path, "domain file")
    raw = check_mapping(raw, str(path), {"name", "slots", "intents", "acts", "replies", "reply"})
    if raw.get("reply", "template") not in REPLY_KINDS:
        raise LlmkitError(f"{path}: reply must be template or chat, got {raw['reply']!r}")
    slots = check_mapping(raw.get("slots"), f"{path}: slots")
    prompts = {}
    for slot, spec in slots.items():
        prompt = check_mapping(spec, f"{path}: slot {slot!r}", {"prompt"}).get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise LlmkitError(f"{path}: slot {slot!r} needs a prompt (the question that asks for it)")
        prompts[str(slot)] = prompt
    intents = check_mapping(raw.get("intents"), f"{path}: intents")
    if not intents:
        raise LlmkitError(f"{path}: no intents")
    tasks = {str(name): _task(str(name), spec, prompts, str(path)) for name, spec in intents.items()}
    acts = {str(k): str(v) for k, v in check_mapping(raw.get("acts", {}), f"{path}: acts", set(ACTS)).items()}
    replies = {**DEFAULT_REPLIES, **check_mapping(raw.get("replies", {}), f"{path}: replies", set(DEFAULT_REPLIES))}
    clash = sorted(set(tasks) & set(acts.values()))
    if clash:
        raise LlmkitError(f"{path}: intent {clash[0]!r} is both a task and a dialogue act")
    return Domain(str(raw.get("name", path.stem)), prompts, tasks, acts, {k: str(v) for k, v in replies.items()},
                  raw.get("reply", "template"))
