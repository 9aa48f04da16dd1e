"""A task-oriented dialogue system: NLU -> state tracking -> policy -> reply, one turn at a time.

State tracking: a task intent activates its task (a different task starts over); slot values the NLU
finds fill the state, and a value for a slot already filled overwrites it (a correction). "deny" while
confirming reopens the slots, "cancel" drops the task, "affirm" while confirming runs the action.
Policy: ask for the first missing required slot, then confirm every value, then execute.
Reply: the domain's templates, or (reply="chat") the chat model rewording the template's message.
"""
from __future__ import annotations

import json
import sys
import uuid
from dataclasses import asdict, dataclass, field

from llmkit.apps.domain import Domain
from llmkit.apps.nlu import NLU
from llmkit.errors import LlmkitError

CHAT_SYSTEM = ("You are the friendly assistant of a booking service. Rewrite the given message for the customer "
               "in one or two short sentences. Keep every name, number, day and time exactly as given.")


@dataclass
class DialogState:
    task: str | None = None                  # the active task intent
    slots: dict[str, str] = field(default_factory=dict)
    awaiting: str | None = None              # a slot name, "confirm", or None
    corrected: list[str] = field(default_factory=list)   # slots overwritten this task
    turns: int = 0


@dataclass
class Turn:
    reply: str
    act: str                                 # the policy's decision: ask:SLOT, confirm, execute, ...
    nlu: dict
    state: dict
    action: dict | None = None               # {"action", "slots"} when a task ran this turn


class ChatReplier:
    """Rewords the policy's template message with a chat model (greedy, short)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 60):
        from llmkit.infer.sampling import SamplingParams

        self.model, self.tokenizer = model, tokenizer
        self.params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def __call__(self, message: str, state: DialogState) -> str:
        from llmkit.infer.chat import ChatSession

        session = ChatSession(self.model, self.tokenizer, system=CHAT_SYSTEM, params=self.params)
        return session.reply(chat_request(message, state.slots)).strip() or message


def chat_request(message: str, slots: dict) -> str:
    """The user turn that asks the chat model (system prompt CHAT_SYSTEM) to word `message`."""
    known = ", ".join(f"{k}={v}" for k, v in slots.items()) or "nothing yet"
    return f"Booking details so far: {known}.\nMessage: {message}"


class Dialog:
    """One conversation. `turn(text)` returns a Turn; `actions` lists every executed action."""

    def __init__(self, domain: Domain, nlu: NLU, replier=None):
        domain.check_nlu(nlu.intents, nlu.slot_types)
        self.domain, self.nlu, self.replier = domain, nlu, replier
        self.state = DialogState()
        self.actions: list[dict] = []

    # ---- state tracking ---------------------------------------------------------------------
    def _fill(self, slots: dict[str, str]) -> list[str]:
        """Put the NLU's values for the active task's slots into the state; return the slots that changed."""
        task = self.domain.tasks[self.state.task]
        changed = []
        for slot, value in slots.items():
            if slot not in task.slots or self.state.slots.get(slot) == value:
                continue
            if slot in self.state.slots:
                self.state.corrected.append(slot)
            self.state.slots[slot] = value
            changed.append(slot)
        return changed

    def _task_for(self, slots: dict) -> str | None:
        """With no active task, values alone pick the one task that takes them all (if exactly one does)."""
        fits = [name for name, t in self.domain.tasks.items() if slots and set(slots) <= set(t.slots)]
        return fits[0] if len(fits) == 1 else None

    def _track(self, intent: str | None, slots: dict) -> str | None:
        """Update the state for one NLU result; return a finished policy act, or None to let the policy pick."""
        act, s = self.domain.act_of(intent), self.state
        if intent in self.domain.tasks:
            if s.task != intent:
                self.state = s = DialogState(task=intent, turns=s.turns)
            self._fill(slots)
            return None
        if act == "cancel":
            self.state = DialogState(turns=s.turns)
            return "cancelled"
        if act == "greet" and s.task is None and not slots:
            return "greet"
        if s.task is None and slots:
            s.task = self._task_for(slots)
        if s.task is None:
            return "fallback"
        changed = self._fill(slots)
        if act == "affirm" and s.awaiting == "confirm" and not changed:
            return "execute"
        if act == "deny" and s.awaiting == "confirm" and not changed:
            s.awaiting = None
            return "ask_change"
        if act == "affirm" and s.awaiting != "confirm" and not changed:
            return "nothing_to_confirm" if s.awaiting is None else None
        return None

    # ---- policy and reply ---------------------------------------------------------------------
    def _policy(self) -> tuple[str, str]:
        task = self.domain.tasks[self.state.task]
        missing = [slot for slot in task.required if slot not in self.state.slots]
        if missing:
            self.state.awaiting = missing[0]
            return f"ask:{missing[0]}", self.domain.prompts[missing[0]]
        self.state.awaiting = "confirm"
        return "confirm", task.confirm.format(**self.state.slots)

    def _execute(self) -> tuple[str, dict]:
        task = self.domain.tasks[self.state.task]
        action = {"action": task.action, "intent": task.name, "slots": dict(self.state.slots)}
        message = task.done.format(**self.state.slots)
        self.actions.append(action)
        self.state = DialogState(turns=self.state.turns)
        return message, action

    def turn(self, text: str) -> Turn:
        nlu = self.nlu.parse([text])[0]
        self.state.turns += 1
        decided = self._track(nlu["intent"], nlu["slots"])
        action = None
        if decided == "execute":
            message, action = self._execute()
        elif decided is not None:
            message = self.domain.replies[decided]
        else:
            decided, message = self._policy()
        if self.replier is not None:
            message = self.replier(message, self.state)
        return Turn(message, decided, nlu, asdict(self.state), action)


class Sessions:
    """Dialogs by session id, for the HTTP endpoint; the oldest is dropped past `limit`."""

    def __init__(self, domain: Domain, nlu: NLU, replier=None, limit: int = 1000):
        domain.check_nlu(nlu.intents, nlu.slot_types)
        self.domain, self.nlu, self.replier, self.limit = domain, nlu, replier, limit
        self.dialogs: dict[str, Dialog] = {}

    def turn(self, session_id: str | None, text: str) -> tuple[str, Turn]:
        if session_id is None:
            session_id = uuid.uuid4().hex
            if len(self.dialogs) >= self.limit:
                self.dialogs.pop(next(iter(self.dialogs)))
            self.dialogs[session_id] = Dialog(self.domain, self.nlu, self.replier)
        elif session_id not in self.dialogs:
            raise LlmkitError(f"unknown session {session_id!r}; leave session_id out to start one")
        return session_id, self.dialogs[session_id].turn(text)


def dialog_loop(dialog: Dialog, input_fn=None, out=None, actions_file=None, show_state: bool = False) -> None:
    """The terminal conversation: /state prints the state, /reset starts over, /exit quits."""
    input_fn, out = input_fn or input, out or sys.stdout  # looked up now: tests replace them
    print(f"{dialog.domain.name}: /state shows the dialogue state, /reset starts over, /exit quits", file=out)
    while True:
        try:
            text = input_fn("> ").strip()
        except EOFError:
            return
        if text in ("/exit", "/quit"):
            return
        if text in ("/state", "/reset"):
            if text == "/reset":
                dialog.state = type(dialog.state)()
            print(json.dumps(asdict(dialog.state)), file=out)
            continue
        if not text:
            continue
        turn = dialog.turn(text)
        print(turn.reply, file=out)
        if show_state:
            print(f"  [{turn.act}] intent={turn.nlu['intent']} slots={turn.nlu['slots']} "
                  f"state={turn.state['slots']}", file=out)
        if turn.action is not None:
            print(f"  [action] {json.dumps(turn.action)}", file=out)
            if actions_file is not None:
                with open(actions_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps(turn.action) + "\n")
