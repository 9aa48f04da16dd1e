"""Trainer: schedule, optimizer groups, accumulation, AMP, logging, checkpoints and exact resume."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import make_data_dir, read_metrics, run_cli, tiny_config, train_losses

from llmkit.train import state as train_state
from llmkit.io.checkpoint import load_checkpoint
from llmkit.model.config import preset
from llmkit.errors import LlmkitError
from llmkit.io import snapshots
from llmkit.model.decoder import GPT
from llmkit.train.optim import build_adamw, lr_at, param_groups
from llmkit.train.perf import measure_peak_flops, mfu
from llmkit.train.trainer import Trainer, load_train_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("train-data"))


def test_lr_schedule_warmup_cosine_then_constant():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(4, **kw) == pytest.approx(0.5)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway: mean of lr and min_lr
    assert lr_at(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.1)
    assert lr_at(5000, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(0, lr=1.0, min_lr=0.1, warmup_steps=0, decay_steps=100) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["char-tiny", "llama-tiny", "gpt2-124m"])
def test_param_groups_decay_only_weight_matrices(name):
    model = GPT(preset(name, n_layer=2, n_embd=64, n_head=4, n_kv_head=2 if name == "llama-tiny" else None,
                       vocab_size=97, block_size=32))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not decayed & kept
    assert decayed | kept == set(names.values())  # every parameter exactly once (tied lm_head included)
    assert "embed.weight" in kept
    assert ("pos_embed.weight" in kept) == (model.pos_embed is not None)
    assert all(n.endswith("weight") and ("qkv" in n or "proj" in n or "fc" in n or "gate_up" in n or "lm_head" in n)
               for n in decayed)
    assert all("norm" in n or n.endswith("bias") or "embed" in n for n in kept)
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.proj.weight" in decayed
    assert ("lm_head.weight" in decayed) == (not model.config.tie_embeddings)
    if model.config.bias:
        assert "blocks.0.attn.qkv.bias" in kept and "final_norm.bias" in kept


def test_adamw_uses_fused_kernel_on_cpu():
    model = GPT(preset("char-tiny", n_layer=1))
    opt = build_adamw(model, 1e-3, 0.1, (0.9, 0.99), "cpu")
    assert opt.defaults["fused"] is True
    loss = model(torch.zeros(1, 4, dtype=torch.long), targets=torch.ones(1, 4, dtype=torch.long))[1]
    loss.backward()
    opt.step()  # the fused CPU kernel really runs


def test_peak_flops_measured_once_and_mfu():
    first = measure_peak_flops("cpu", torch.float32, seconds=0.05)
    assert first > 1e8
    assert measure_peak_flops("cpu", torch.float32) == first  # cached per process
    assert mfu(1e6, 1e3, 1e10) == pytest.approx(0.1)


def test_grad_accum_matches_larger_batch(data_dir, tmp_path):
    # batch 8 in one micro-step vs 2 micro-steps of 4: the sampler draws the same 8 windows.
    runs = {}
    for name, batch, accum in (("big", 8, 1), ("accum", 4, 2)):
        trainer = Trainer(tiny_config(data_dir, tmp_path / name, batch_size=batch, grad_accum=accum,
                                      max_steps=4, eval_interval=0))
        trainer.fit()
        runs[name] = (trainer.raw_model.state_dict(), train_losses(tmp_path / name))
    (w_big, loss_big), (w_acc, loss_acc) = runs["big"], runs["accum"]
    assert loss_big.keys() == loss_acc.keys() == {1, 2, 3, 4}
    for step in loss_big:
        assert loss_acc[step] == pytest.approx(loss_big[step], abs=1e-5)
    for name in w_big:
        torch.testing.assert_close(w_acc[name], w_big[name], atol=1e-5, rtol=1e-4)


def test_resume_reproduces_uninterrupted_run(data_dir, tmp_path):
    # dropout > 0 so the restored torch RNG state matters, not only the sampler position
    kw = dict(model={"dropout": 0.1}, max_steps=8, lr_decay_steps=8, eval_interval=4)
    straight = Trainer(tiny_config(data_dir, tmp_path / "straight", **kw))
    straight.fit()
    Trainer(tiny_config(data_dir, tmp_path / "split", **{**kw, "max_steps": 4})).fit()
    resumed = Trainer(tiny_config(data_dir, tmp_path / "split", **kw), resume=True)
    assert resumed.step == 4
    resumed.fit()
    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "split")
    assert a.keys() == b.keys() == set(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    for name, tensor in straight.raw_model.state_dict().items():
        torch.testing.assert_close(resumed.raw_model.state_dict()[name], tensor, atol=1e-6, rtol=0)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "split") if "val_loss" in r}
    vals_straight = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "straight") if "val_loss" in r}
    assert vals[8] == pytest.approx(vals_straight[8], abs=1e-6)


def test_same_seed_same_run_other_seed_other_run(data_dir, tmp_path):
    kw = dict(model={"dropout": 0.1}, max_steps=3, eval_interval=0)
    losses = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        Trainer(tiny_config(data_dir, tmp_path / name, seed=seed, **kw)).fit()
        losses.append(train_losses(tmp_path / name))
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_resume_rejects_other_config_and_bad_state(data_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LlmkitError, match="holds no checkpoint"):
        Trainer(tiny_config(data_dir, out), resume=True)
    Trainer(tiny_config(data_dir, out, max_steps=2, eval_interval=0)).fit()
    with pytest.raises(LlmkitError, match="another model config.*n_embd"):
        Trainer(tiny_config(data_dir, out, model={"n_embd": 48}), resume=True)
    state_file = out / train_state.STATE_FILE
    good = state_file.read_bytes()
    for bad in (b"not a checkpoint", good[: len(good) // 2]):
        state_file.write_bytes(bad)
        with pytest.raises(LlmkitError, match="corrupt training state"):
            Trainer(tiny_config(data_dir, out), resume=True)
    # a state from another step than the weights (a crash between the final renames)
    state = torch.load(__import__("io").BytesIO(good), weights_only=True)
    state["step"] = 1
    torch.save(state, state_file)
    with pytest.raises(LlmkitError, match="from step 2 but"):
        Trainer(tiny_config(data_dir, out), resume=True)


def test_metrics_checkpoint_and_tensorboard(data_dir, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, log_interval=2, ckpt_interval=3, tensorboard=True))
    final = trainer.fit()
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert [r["step"] for r in evals] == [3, 6]
    for r in train:
        assert {"lr", "tokens_per_s", "mfu", "elapsed", "tokens"} <= r.keys()
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and math.isfinite(r["loss"])
    assert train[-1]["tokens"] == 6 * 4 * 16
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert final["step"] == 6 and final["val_loss"] == evals[-1]["val_loss"]
    assert train[0]["loss"] > train[-1]["loss"]  # it learns
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_state.pt"} <= {p.name for p in out.iterdir()}
    steps = sorted(p.name for p in (out / snapshots.CKPT_DIR).iterdir())
    assert steps == [snapshots.LATEST, "step-00000006"]  # the step-3 checkpoint was replaced, nothing left over
    assert list((out / "tensorboard").iterdir())
    model, tokenizer = load_checkpoint(out)
    for name, tensor in trainer.raw_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor)
    assert tokenizer.decode(tokenizer.encode("the king")) == "the king"
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 6 and state["config"]["max_steps"] == 6


def test_bf16_autocast_runs_on_cpu(data_dir, tmp_path):
    trainer = Trainer(tiny_config(data_dir, tmp_path, dtype="bfloat16", max_steps=2, eval_iters=1))
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["val_loss"])
    assert trainer.raw_model.embed.weight.dtype == torch.float32  # autocast, not a bf16 model


def test_fp16_on_cpu_is_an_error(data_dir, tmp_path):
    with pytest.raises(LlmkitError, match="float16 needs a CUDA device"):
        Trainer(tiny_config(data_dir, tmp_path, dtype="float16", device="cpu"))


def test_bad_data_dir_and_sizes(data_dir, tmp_path):
    with pytest.raises(LlmkitError, match="does not exist"):
        Trainer(tiny_config(tmp_path / "nope", tmp_path / "out"))
    with pytest.raises(LlmkitError, match="exceeds model.block_size"):
        Trainer(tiny_config(data_dir, tmp_path / "out", model={"block_size": 8}))
    with pytest.raises(LlmkitError, match="unknown objective"):
        Trainer(tiny_config(data_dir, tmp_path / "out", objective="mlm-typo"))


def test_failed_save_leaves_previous_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(data_dir, out, max_steps=3, eval_interval=0))
    trainer.fit()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
    trainer.train_step()  # the weights now differ from the saved ones

    def boom(*args, **kwargs):
        raise OSError("disk full")

    for target in ("torch.save", "llmkit.io.checkpoint.save_file"):
        with monkeypatch.context() as m:
            m.setattr(target, boom)
            with pytest.raises(OSError, match="disk full"):
                trainer.save()
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
        assert after == before, target
        assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))  # no temp files left behind
    resumed = Trainer(tiny_config(data_dir, out, max_steps=3, eval_interval=0), resume=True)
    assert resumed.step == 3


def test_yaml_config_with_typed_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data_dir: some/data\nlr: 3e-4\nmax_steps: 10\ncompile: false\n"
                    "model:\n  n_layer: 2\n  dropout: 0.1\n", encoding="utf-8")
    cfg = load_train_config(path, ["batch_size=16", "min_lr=1e-5", "model.n_head=2", "compile=yes",
                                   "peak_flops=none", "model.pos=rope"], out_dir="elsewhere", max_steps=None)
    assert cfg.data_dir == "some/data" and cfg.out_dir == "elsewhere"
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)  # YAML reads 3e-4 as a string; the field types it
    assert cfg.batch_size == 16 and cfg.max_steps == 10 and cfg.compile is True and cfg.peak_flops is None
    assert cfg.model == {"n_layer": 2, "dropout": 0.1, "n_head": 2, "pos": "rope"}
    assert load_train_config(None, ["max_steps=5"], max_steps=7).max_steps == 7  # shortcuts win


@pytest.mark.parametrize("yaml_text, overrides, message", [
    ("", ["learning_rate=1"], "unknown training config key 'learning_rate'"),
    ("", ["model.n_layers=2"], "unknown model config key 'n_layers'"),
    ("", ["max_steps=ten"], "bad value for max_steps: 'ten' is not an integer"),
    ("", ["lr=fast"], "bad value for lr"),
    ("", ["compile=maybe"], "bad value for compile"),
    ("", ["model.dropout=x"], "bad value for model.dropout"),
    ("", ["lr"], "expected key=value"),
    ("", ["preset=gpt5"], "preset 'gpt5'"),
    ("", ["dtype=float8"], "dtype 'float8'"),
    ("max_steps: [1, 2]\n", [], "bad value for max_steps"),
    ("optimizer: sgd\n", [], "unknown training config key 'optimizer'"),
    ("model:\n  n_embed: 4\n", [], "unknown model config key 'n_embed'"),
    ("- a\n- b\n", [], "must hold a mapping"),
    ("lr: [unclosed\n", [], "not valid YAML"),
])
def test_config_errors(tmp_path, yaml_text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(LlmkitError, match=re.escape(message)):
        load_train_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(LlmkitError, match="cannot read config"):
        load_train_config(tmp_path / "nope.yaml")


def test_train_cli_runs_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"data_dir: {data_dir}\nblock_size: 16\nbatch_size: 4\neval_iters: 2\nprogress: false\n"
                      "peak_flops: 1.0e11\nwarmup_steps: 1\nlr_decay_steps: 4\n"
                      "model: {n_layer: 1, n_head: 2, n_embd: 32}\n", encoding="utf-8")
    out = tmp_path / "run"
    code, stdout, _ = run_cli(monkeypatch, capsys, "train", config, "log_interval=1", "--out", out,
                              "--max-steps", 2)
    assert code == 0 and "step 2: loss" in stdout and (out / "model.safetensors").exists()
    code, stdout, _ = run_cli(monkeypatch, capsys, "train", config, "--out", out, "--max-steps", 3, "--resume")
    assert code == 0 and "step 3:" in stdout
    assert sorted(train_losses(out)) == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--data", "/nonexistent/dir"], "data dir /nonexistent/dir does not exist"),
    (["--preset", "gpt-99"], "preset 'gpt-99'"),
    (["momentum=0.9"], "unknown training config key 'momentum'"),
    (["batch_size=big"], "bad value for batch_size"),
    (["--resume", "model.n_embd=48"], "another model config"),
    (["--resume", "CORRUPT"], "corrupt training state"),
])
def test_train_cli_errors(data_dir, tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "run"
    base = [f"data_dir={data_dir}", "block_size=16", "batch_size=4", "model.n_layer=1", "model.n_head=2",
            "model.n_embd=32", "progress=false", "peak_flops=1e11", "eval_interval=0", "--out", out]
    if "--resume" in args:
        assert run_cli(monkeypatch, capsys, "train", *base, "--max-steps", 1)[0] == 0
    if "CORRUPT" in args:
        (out / "train_state.pt").write_bytes(b"\0" * 100)
        args = ["--resume"]
    code, _, err = run_cli(monkeypatch, capsys, "train", *base, *args)
    assert code == 1
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_example_configs_parse():
    examples = sorted((Path(__file__).resolve().parents[1] / "examples").glob("train_*.yaml"))
    assert examples
    for path in examples:
        cfg = load_train_config(path, ["max_steps=1"])
        assert cfg.max_steps == 1 and cfg.preset
