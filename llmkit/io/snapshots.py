"""Crash-safe checkpoints: each save is a complete step directory, switched in by one atomic rename.

A training run directory looks like this:

    .checkpoints/step-00000120/     config.json, model.safetensors, tokenizer.json, train_state.pt (or shards/)
    .checkpoints/latest -> step-00000120     the pointer: replacing it is the single commit step
    config.json -> .checkpoints/latest/config.json     one link per checkpoint file, so the run directory
    ...                                                 itself reads as a model directory

A save writes the new step directory under a temporary name, fsyncs its files, renames it, fsyncs the
parent, then replaces `latest` (os.replace of a symlink is atomic on POSIX) and fsyncs again. A kill at
any moment leaves `latest` naming either the old complete step or the new one; whatever else it left
behind (temporary step directories, unreferenced steps, temporary links) is removed by `clean`, which
every save and resume runs first.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

CKPT_DIR = ".checkpoints"
LATEST = "latest"
LEGACY_STATE = "train_state.pt"  # a run directory from before step directories kept its files at the top


def fault_point() -> None:
    """Called between every two file operations of a save; the fault-injection test kills saves here."""


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file below `root`, then each directory (deepest first), so a rename exposes only
    data that is on disk."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(Path(here))
        for name in files:
            fsync_path(Path(here) / name)
    for d in reversed(dirs):
        fsync_path(d)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_dir(run_dir, step: int) -> Path:
    """Where the save of `step` is written before it is committed (the same path on every rank)."""
    return Path(run_dir) / CKPT_DIR / f"{step_name(step)}.tmp"


def latest(run_dir) -> Path | None:
    """The committed step directory, or None."""
    link = Path(run_dir) / CKPT_DIR / LATEST
    if not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    return target if target.is_dir() else None


def current(run_dir) -> Path | None:
    """The directory holding the checkpoint to resume from: the latest step, or (older runs) the run dir."""
    run_dir = Path(run_dir)
    found = latest(run_dir)
    if found is None and (run_dir / LEGACY_STATE).is_file():
        return run_dir
    return found


def holds_checkpoint(run_dir) -> bool:
    """True when `run_dir` holds a training checkpoint or a model a new run would replace."""
    run_dir = Path(run_dir)
    return current(run_dir) is not None or (run_dir / "config.json").exists()


def clean(run_dir) -> None:
    """Remove what interrupted saves left: temporary step dirs and links, steps `latest` does not name,
    half-written top-level files (atomic_path's .NAME.*.tmp) and links into a step that is gone."""
    run_dir, keep = Path(run_dir), latest(run_dir)
    ckpt = run_dir / CKPT_DIR
    if ckpt.is_dir():
        for entry in ckpt.iterdir():
            if entry.name == LATEST:
                continue
            if entry.is_symlink() or entry.is_file():
                entry.unlink()
            elif keep is None or entry.name != keep.name:
                shutil.rmtree(entry)
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            stale_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp") and not entry.is_dir()
            dangling = entry.is_symlink() and os.readlink(entry).startswith(CKPT_DIR) and not entry.exists()
            if stale_tmp or dangling:
                entry.unlink()


def begin(run_dir, step: int) -> Path:
    """Clean up, then create the empty staging directory for `step` (call on one rank only)."""
    clean(run_dir)
    stage = staging_dir(run_dir, step)
    stage.mkdir(parents=True)
    fault_point()
    return stage


def commit(run_dir, stage: Path) -> Path:
    """Make the complete staging directory the checkpoint of the run, atomically; returns the step dir."""
    run_dir = Path(run_dir)
    ckpt = stage.parent
    fsync_tree(stage)
    fault_point()
    final = stage.with_name(stage.name.removesuffix(".tmp"))
    if final.exists():  # the same step saved again (an unreferenced leftover was cleaned in begin)
        shutil.rmtree(final)
        fault_point()
    os.rename(stage, final)
    fault_point()
    fsync_path(ckpt)
    fault_point()
    _swap_link(ckpt / LATEST, final.name)  # the commit
    fault_point()
    publish(run_dir)
    clean(run_dir)  # drop the previous step
    fault_point()
    return final


def publish(run_dir) -> None:
    """Link every file of the latest step into the run directory (idempotent; rank 0 only)."""
    run_dir = Path(run_dir)
    step = latest(run_dir)
    if step is None:
        return
    changed = False
    for entry in sorted(step.iterdir()):
        link, target = run_dir / entry.name, f"{CKPT_DIR}/{LATEST}/{entry.name}"
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)  # a directory left by an older layout
        _swap_link(link, target)
        changed = True
        fault_point()
    if changed:
        fsync_path(run_dir)
        fault_point()


def _swap_link(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.link.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    fault_point()
    os.replace(tmp, link)
    fsync_path(link.parent)
