"""Crash-safe checkpoints (issue 13, defects 5 and 6).

Deterministic fault injection: a save is killed between every two of its file operations (at each
`snapshots.fault_point`), for the first save of a run and for one that replaces an older checkpoint.
After every kill `--resume` must continue, and the finished run must equal an uninterrupted one bit
for bit. The kill is an exception no `except Exception` catches and that the save's own code never
sees again, so the files on disk are exactly what a SIGKILL at that instant leaves (fsync guards the
rest: a power cut, which a test cannot stage).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_data_dir, run_cli, tiny_config, train_losses

from llmkit.data.corpus import prepare
from llmkit.errors import LlmkitError
from llmkit.io import snapshots
from llmkit.tokenizer import Tokenizer
from llmkit.train.trainer import Trainer

# saves at steps 2 and 4; dropout so that restoring the RNG state matters too
RUN = dict(max_steps=4, lr_decay_steps=4, ckpt_interval=2, eval_interval=0,
           model={"dropout": 0.1, "n_layer": 1, "n_embd": 16})


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no cleanup handler in the save runs."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("fault-data"))


def leftovers(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp"))


def test_kill_at_every_file_operation_of_a_save_then_resume_is_exact(data_dir, tmp_path, monkeypatch):
    straight = Trainer(tiny_config(data_dir, tmp_path / "straight", **RUN))
    points: list[int] = []  # the step being saved, once per fault point
    monkeypatch.setattr(snapshots, "fault_point", lambda: points.append(straight.step))
    straight.fit()
    assert points.count(2) > 10 and points.count(4) > 5 and set(points) == {2, 4}
    expected_losses, expected = train_losses(tmp_path / "straight"), straight.raw_model.state_dict()

    for kill_at, saving_step in enumerate(points):
        out = tmp_path / f"kill{kill_at}"
        calls = iter(range(len(points)))

        def fault(kill_at=kill_at, calls=calls):
            if next(calls) == kill_at:
                raise Killed

        monkeypatch.setattr(snapshots, "fault_point", fault)
        with pytest.raises(Killed):
            Trainer(tiny_config(data_dir, out, **RUN)).fit()
        monkeypatch.setattr(snapshots, "fault_point", lambda: None)
        try:
            resumed = Trainer(tiny_config(data_dir, out, **RUN), resume=True)
        except LlmkitError as e:  # killed before the first checkpoint existed: nothing to resume
            assert saving_step == 2 and "holds no checkpoint" in str(e), (kill_at, str(e))
            resumed = Trainer(tiny_config(data_dir, out, **RUN))  # and no --overwrite is needed
        assert resumed.step in (0, 2, 4) and resumed.step <= saving_step, kill_at
        resumed.fit()
        assert train_losses(out) == expected_losses, kill_at
        for name, tensor in resumed.raw_model.state_dict().items():
            assert torch.equal(tensor, expected[name]), (kill_at, name)
        assert leftovers(out) == [], kill_at
        assert sorted(p.name for p in (out / snapshots.CKPT_DIR).iterdir()) == ["latest", "step-00000004"]


class DiskFull(OSError):
    pass


@pytest.mark.parametrize("fault", [Killed, DiskFull])
def test_a_sharded_save_broken_while_writing_shards_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch,
                                                                                    fault):
    """strategy=fsdp: step 4's shards are written, one is cut in half and the save dies (Killed) or
    fails (an exception): `latest` still names step 2, and --resume continues from it exactly."""
    import torch.distributed.checkpoint as dcp

    run = dict(RUN, strategy="fsdp")
    straight = Trainer(tiny_config(data_dir, tmp_path / "straight", **run))
    straight.fit()
    real_save = dcp.save

    def broken_save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        if "step-00000004" in checkpoint_id:
            shard = max(Path(checkpoint_id).glob("*.distcp"), key=lambda p: p.stat().st_size)
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            raise fault("no space left on device")

    out = tmp_path / "broken"
    monkeypatch.setattr(dcp, "save", broken_save)
    with pytest.raises(fault):
        Trainer(tiny_config(data_dir, out, **run)).fit()
    monkeypatch.setattr(dcp, "save", real_save)
    assert snapshots.latest(out).name == "step-00000002"
    assert (out / snapshots.CKPT_DIR / "step-00000004.tmp" / "shards" / ".metadata").is_file()  # complete-looking
    resumed = Trainer(tiny_config(data_dir, out, **run), resume=True)
    assert resumed.step == 2 and leftovers(out) == []  # the broken step is removed, never read
    resumed.fit()
    assert train_losses(out) == train_losses(tmp_path / "straight")
    for name, tensor in resumed.raw_model.state_dict().items():
        assert torch.equal(tensor.to_local(), straight.raw_model.state_dict()[name].to_local()), name  # 1 rank: whole


def test_training_into_a_checkpoint_needs_resume_or_overwrite(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", f"data_dir={data_dir}", f"out_dir={out}", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=16", "block_size=16", "batch_size=2", "eval_interval=0", "progress=false",
            "peak_flops=1e11", "--max-steps", "2"]
    assert run_cli(monkeypatch, capsys, *args)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, stdout, stderr = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and "--resume" in stderr and "--overwrite" in stderr, stderr
    assert (out / "model.safetensors").read_bytes() == before
    code, _, stderr = run_cli(monkeypatch, capsys, *args, "--overwrite", "seed=5")
    assert code == 0, stderr
    assert (out / "model.safetensors").read_bytes() != before  # replaced by the new run


def test_leftovers_of_an_interrupted_prepare_are_removed(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 50, encoding="utf-8")
    stale = tmp_path / ".data.k3j4h5.tmp"  # what a kill during `prepare --out data` leaves
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 64)
    prepare([corpus], tmp_path / "data", Tokenizer.train_char(["to be or not"]), val_fraction=0.1)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data"]
