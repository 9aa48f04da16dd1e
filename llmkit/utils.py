"""Small helpers shared across modules."""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

from llmkit.errors import LlmkitError


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; users expect their umask
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


def read_yaml(path, what: str):
    """The parsed YAML file at `path` (a domain file, a mixture file, ...); problems name the file."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LlmkitError(f"no such {what}: {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LlmkitError(f"cannot read {what} {path}: {str(e).splitlines()[0]}") from None


def check_mapping(value, where: str, keys: set[str] | None = None) -> dict:
    """`value` if it is a mapping whose keys are all among `keys` (when given); else one clear error."""
    if not isinstance(value, dict):
        raise LlmkitError(f"{where} must be a mapping")
    unknown = sorted(set(value) - keys) if keys is not None else []
    if unknown:
        raise LlmkitError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")
    return value


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


def check_output(path, kind: str = "file", what: str = "--out") -> Path:
    """Refuse an output location that cannot be written, before any work is done.

    kind "file": `path` must not be a directory; kind "dir": it must not be a file. Either way the
    nearest existing folder on the way must be a writable directory: a probe file is created and
    removed there (os.access says yes to root even on read-only mounts)."""
    path = Path(path).expanduser()
    if not str(path).strip():
        raise LlmkitError(f"{what} is empty")
    if kind == "file" and (path.is_dir() or str(path).endswith(os.sep)):
        raise LlmkitError(f"{what} {path} is a directory; give a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise LlmkitError(f"{what} {path} is a file, not a directory")
    folder = path if kind == "dir" else path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise LlmkitError(f"{what} {path} cannot be created: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmkit-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LlmkitError(f"{what} {path} is not writable: {e.strerror or e} in {folder}") from None
    return path


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                integer: bool = False):
    """`value` if it is a number (an int when `integer`) within [low, high] (open ends as asked);
    otherwise LlmkitError saying what `name` must be. NaN, infinities and bools are never numbers here."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return value
    if low is not None and high is not None:
        bound = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        bound = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        bound = f"{'<' if high_open else '<='} {high}"
    else:
        bound = "a finite number"
    noun = "an integer" if integer else "a number"
    raise LlmkitError(f"{name} must be {noun} {bound}, got {value!r}" if bound != "a finite number"
                      else f"{name} must be {bound}, got {value!r}")


def check_device(device: str, what: str = "--device") -> str:
    """The torch device string for `device` (auto, cpu, cuda, cuda:N, mps), checked against this machine."""
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise LlmkitError(f"{what} {device!r} is not a device (auto, cpu, cuda, cuda:N, mps)")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LlmkitError(f"{what} {device}: this machine has no CUDA GPU that torch can use (try cpu)")
        if index and int(index) >= count:
            raise LlmkitError(f"{what} {device}: there are only {count} CUDA devices (cuda:0..cuda:{count - 1})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LlmkitError(f"{what} mps: Apple's Metal backend is not available on this machine (try cpu)")
    return name


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
              type(None): "null"}


def check_field_types(instance, what: str) -> None:
    """Every field of a dataclass instance holds its annotated type (int, float, bool, str, dict,
    or None where Optional): config.json's `"n_layer": "4"` or `true` fails here, naming the key,
    instead of deep inside torch. Ints stand in for floats; bools never stand in for numbers."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value, hint = getattr(instance, field.name), hints[field.name]
        allowed = typing.get_args(hint) or (hint,)
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool):
            ok = bool in allowed
        elif isinstance(value, int):
            ok = int in allowed or float in allowed
        else:
            ok = any(isinstance(value, t) for t in allowed if isinstance(t, type) and t is not type(None))
        if not ok:
            names = " or ".join(TYPE_NAMES.get(t, getattr(t, "__name__", str(t))) for t in allowed)
            raise LlmkitError(f"{what} {field.name} must be {names}, got {value!r}")


def check_state(state: dict, expected: dict, source, what: str = "weights") -> None:
    """Saved tensors must be exactly the ones a model holds, name for name and shape for shape;
    the error names `source` and the first differences."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LlmkitError(f"{source}: {what} do not match the config: missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise LlmkitError(f"{source}: {what} do not match the config: {name} has shape "
                              f"{tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)}")


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs):
    """A tqdm bar on stderr for a long job. Shown on a terminal only (logs and pipes stay clean);
    LLMKIT_PROGRESS=1 shows it anyway, LLMKIT_PROGRESS=0 never."""
    import sys

    from tqdm.auto import tqdm

    setting = os.environ.get("LLMKIT_PROGRESS", "")
    disable = {"1": False, "0": True}.get(setting, not sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=False,
                dynamic_ncols=True, **kwargs)
