"""The compiled-kernel cache: a library that changed since its build is rebuilt, not loaded; a lock
file planted as a symlink is not followed; a cache folder others can write to is refused.
A stand-in compiler command keeps these tests instant (the real build is tests/test_kernels.py's)."""
from __future__ import annotations

import os

import pytest

from llmkit.infer import kernels


@pytest.fixture
def cache(tmp_path, monkeypatch):
    builds = tmp_path / "builds.log"

    def fake_command(compiler, output, *args):
        return ["sh", "-c", f'echo library > "{output}"; echo x >> "{builds}"']

    monkeypatch.setenv("LLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_build_command", fake_command)
    return lambda: len(builds.read_text().splitlines()) if builds.exists() else 0


def test_a_changed_library_is_rebuilt_not_loaded(cache):
    path = kernels._build("c++")
    assert cache() == 1 and path.read_text() == "library\n"
    assert kernels._build("c++") == path and cache() == 1  # intact: reused
    path.write_text("something else\n")  # tampered with (or half-written by a crash) after the build
    kernels._build("c++")
    assert cache() == 2 and path.read_text() == "library\n"
    path.with_suffix(".sha256").unlink()  # no record of the build: rebuild too
    kernels._build("c++")
    assert cache() == 3


def test_the_lock_is_not_followed_through_a_symlink(cache, tmp_path):
    path = kernels._library_path("c++")
    path.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    path.with_suffix(".lock").symlink_to(victim)
    with pytest.raises(OSError):
        kernels._build("c++")
    assert victim.read_text() == "precious\n" and cache() == 0


def test_a_cache_others_can_write_is_refused(cache):
    folder = kernels._library_path("c++").parent
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    with pytest.raises(RuntimeError, match="writable by other users"):
        kernels._build("c++")
    assert cache() == 0
