"""Small helpers shared across modules."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from llmkit.errors import LlmkitError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    Readers never see a half-written file: either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs):
    """open() for writing that replaces `path` only once the file is complete."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def read_json(path, missing: str | None = None, required: bool = True):
    """The parsed JSON file at `path`.

    A missing file raises LlmkitError(`missing`, default "missing PATH"), or gives {} when not
    `required`; an unreadable or malformed file raises LlmkitError naming it.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if required:
            raise LlmkitError(missing or f"missing {path}") from None
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise LlmkitError(f"cannot read {path}: {e}") from None


def read_jsonl(path, what: str = "data") -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a JSONL file.

    A missing file, bad encoding or malformed line raises LlmkitError naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LlmkitError(f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise LlmkitError(f"{what} {path} is not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise LlmkitError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise LlmkitError(f"{what} {path} is empty")
    return records
