"""Metric curves and attention heatmaps (PNG), and the attention maps' correctness."""
import json

import pytest
import torch
from conftest import run_cli, tiny_decoder, tiny_model_dir

from llmkit.errors import LlmkitError
from llmkit.eval.plot import attention_maps, plot_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, n=12):
    rows = [{"step": s, "loss": 4.0 / s, "lr": 1e-3, "tokens_per_s": 900.0 + s, "mfu": 0.1} for s in range(1, n)]
    rows.append({"step": n - 1, "val_loss": 1.2, "val_ppl": 3.3})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_metrics_png_and_cli(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "metrics.jsonl")
    png = plot_metrics(run, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    code, out, err = run_cli(monkeypatch, capsys, "plot", run)
    assert code == 0, err
    assert (run / "metrics.png").read_bytes()[:8] == PNG and "metrics.png" in out


def test_bad_metrics_files(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 2}\n{"loss": 3}\n')
    with pytest.raises(LlmkitError, match="metrics.jsonl:2: a metrics record needs a numeric 'step'"):
        plot_metrics(bad, tmp_path / "x.png")
    bad.write_text('{"step": 1, "other": 2}\n')
    with pytest.raises(LlmkitError, match="no loss, lr or throughput"):
        plot_metrics(bad, tmp_path / "x.png")
    with pytest.raises(LlmkitError, match="no metrics file|cannot read"):
        plot_metrics(tmp_path / "missing", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("overrides", [{}, {"pos": "learned", "n_kv_head": 4, "norm": "layernorm", "mlp": "gelu"}])
def test_attention_maps_reproduce_the_layer_output(overrides):
    """probs @ v, projected, must equal what the attention module really computed."""
    model = tiny_decoder(97, **overrides).eval()
    ids = list(range(3, 15))
    captured = {}
    attn = model.blocks[1].attn
    hook = attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0], out=out))
    maps, layers, heads = attention_maps(model, ids, layers=[-1], heads=None)
    hook.remove()
    assert layers == [1] and heads == list(range(4)) and maps.shape == (1, 4, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 4, 12))
    assert (maps[0].triu(diagonal=1) == 0).all()  # causal
    H, K, D = attn.n_head, attn.n_kv_head, attn.head_dim
    v = attn.qkv(captured["x"]).split((H * D, K * D, K * D), dim=-1)[2]
    v = v.view(1, 12, K, D).transpose(1, 2).repeat_interleave(H // K, dim=1)
    y = (maps[0][None] @ v).transpose(1, 2).reshape(1, 12, H * D)
    torch.testing.assert_close(attn.proj(y), captured["out"], atol=1e-5, rtol=1e-4)


def test_attention_cli_and_bad_indices(tmp_path, monkeypatch, capsys):
    model_dir = tiny_model_dir(tmp_path / "m")
    code, out, err = run_cli(monkeypatch, capsys, "attention", "--model", model_dir, "the cat sat on the mat",
                             "--layers", "0,-1", "--heads", "0,2", "--out", tmp_path / "att.png")
    assert code == 0, err
    assert (tmp_path / "att.png").read_bytes()[:8] == PNG
    code, _, err = run_cli(monkeypatch, capsys, "attention", "--model", model_dir, "the cat",
                           "--layers", "7", "--out", tmp_path / "no.png")
    assert code == 1 and "layer 7 does not exist (the model has 2)" in err
    code, _, err = run_cli(monkeypatch, capsys, "attention", "--model", model_dir, "the cat",
                           "--heads", "x", "--out", tmp_path / "no.png")
    assert code == 1 and "--heads must be comma-separated integers" in err
    assert not (tmp_path / "no.png").exists()
