"""Pruning: Wanda's scores by hand, unstructured/2:4 masks, structured pruning that keeps the original's
weights and consistent shapes through save/load/HF export (checked against transformers), bad input."""
import math
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import make_data_dir, run_cli, tiny_tokenizer

from llmkit.compress import calibrate, structured
from llmkit.compress.prune import n_m_mask, prune_unstructured, weight_scores
from llmkit.errors import LlmkitError
from llmkit.io.checkpoint import load_checkpoint, save_checkpoint
from llmkit.model.config import ModelConfig, preset
from llmkit.model.decoder import GPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CALIB_TEXT = "the cat sat on the mat and the capital of zorbia is quibble, paris berlin rome blue green. " * 40


def perturbed(config: ModelConfig, seed: int = 0) -> GPT:
    """A random model whose norms and biases are not at their init values, so every mapping is tested."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def llama(vocab: int, **overrides) -> ModelConfig:
    base = dict(vocab_size=vocab, block_size=64, n_layer=4, n_head=6, n_kv_head=3, n_embd=48, intermediate_size=64)
    return preset("llama-tiny", **{**base, **overrides})


def gpt2(vocab: int, **overrides) -> ModelConfig:
    return preset("gpt2-124m", **{**dict(vocab_size=vocab, block_size=64, n_layer=3, n_head=4, n_embd=32), **overrides})


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT, encoding="utf-8")
    return path


def windows(tok, calib):
    return calibrate.calibration_windows(tok, calib, 256, 32)


# -- scores and masks --------------------------------------------------------------------------

def test_wanda_scores_match_a_hand_computed_example():
    weight = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-4.0, 1.0, 0.5, 2.0]])
    x = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 3.0, 0.0, 1.0]])   # two calibration tokens
    stats = calibrate.ActivationStats()
    hook = calibrate._linear_hook(stats, "blocks.0")
    hook(None, (x[:1],))
    hook(None, (x[1:],))                                              # accumulated over calls
    # ||X_j||_2 = sqrt(1+1), sqrt(0+9), sqrt(4+0), sqrt(1+1)
    r2 = 2 ** 0.5
    torch.testing.assert_close(stats.input_norm("blocks.0"), torch.tensor([r2, 3.0, 2.0, r2]))
    scores = weight_scores(weight, "wanda", stats.input_norm("blocks.0"))
    torch.testing.assert_close(scores, torch.tensor([[r2, 6.0, 6.0, 0.5 * r2], [4 * r2, 3.0, 1.0, 2 * r2]]))
    # 50% per row: Wanda keeps columns (1, 2) and (0, 1); magnitude alone would keep (1, 2) and (0, 3)
    for method, kept in (("wanda", [[0, 1, 1, 0], [1, 1, 0, 0]]), ("magnitude", [[0, 1, 1, 0], [1, 0, 0, 1]])):
        linear = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        tiny = SimpleNamespace(blocks=torch.nn.ModuleList([linear]))
        prune_unstructured(tiny, 0.5, method, "row", stats)
        assert (linear.weight != 0).int().tolist() == kept, method


def test_collected_input_norms_equal_the_layer_inputs(tok, calib):
    model = perturbed(llama(tok.vocab_size))
    rows = windows(tok, calib)
    stats = calibrate.collect_stats(model, rows, batch_size=3)
    with torch.no_grad():
        first = model.blocks[0].attn_norm(model.embed(rows))         # rope models add nothing before block 0
    torch.testing.assert_close(stats.input_sq["blocks.0.attn.qkv"], first.pow(2).sum((0, 1)), rtol=1e-4, atol=1e-4)
    assert stats.tokens == rows.numel()


@pytest.mark.parametrize("scope", ["row", "layer", "global"])
@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_zeroes_the_lowest_scores_and_keeps_the_rest(tok, calib, scope, method):
    model = perturbed(llama(tok.vocab_size))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = calibrate.collect_stats(model, windows(tok, calib)) if method == "wanda" else None
    done = prune_unstructured(model, 0.5, method, scope, stats)
    assert done["pruned"] == pytest.approx(done["total"] / 2, abs=64)
    after = model.state_dict()
    for name, tensor in after.items():
        changed = tensor != before[name]
        assert (tensor[changed] == 0).all()                           # only zeros were written
        if not name.startswith("blocks.") or "norm" in name:
            assert not changed.any()                                  # embeddings, head and norms stay
    w, old = after["blocks.1.mlp.proj.weight"], before["blocks.1.mlp.proj.weight"]
    score = weight_scores(old, method, stats.input_norm("blocks.1.mlp.proj") if stats else None)
    if scope == "row":
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        rows = w.shape[0]
        assert (score[w == 0].view(rows, -1).max(1).values <= score[w != 0].view(rows, -1).min(1).values).all()
    elif scope == "layer":
        assert (w == 0).sum() == w.numel() // 2
        assert score[w == 0].max() <= score[w != 0].min()
    else:  # one threshold across every matrix
        names = [k[:-len(".weight")] for k in after if k.startswith("blocks.") and "norm" not in k]
        scores = {n: weight_scores(before[n + ".weight"], method, stats.input_norm(n) if stats else None)
                  for n in names}
        zeroed = torch.cat([s[after[n + ".weight"] == 0] for n, s in scores.items()])
        kept = torch.cat([s[after[n + ".weight"] != 0] for n, s in scores.items()])
        assert zeroed.max() <= kept.min()


def test_two_four_keeps_two_best_of_every_four():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.4, 0.3]])
    assert n_m_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]
    model = perturbed(llama(300))
    prune_unstructured(model, 0.0, "magnitude", pattern=(2, 4))
    w = model.blocks[0].mlp.gate_up.weight
    assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()


# -- structured ------------------------------------------------------------------------------

def test_structured_keeps_the_originals_weights(tok, calib):
    config = llama(tok.vocab_size)
    model = perturbed(config)
    rows = windows(tok, calib)
    stats = calibrate.collect_stats(model, rows)
    base, losses = calibrate.layer_removal_losses(model, rows[:2])
    sizes = structured.Sizes(layers=3, heads=4, mlp=40)
    pruned = structured.prune_structured(model, sizes, stats, losses)
    assert pruned.config.n_layer == 3 and pruned.config.n_kv_head == 2 and pruned.config.intermediate_size == 40
    kept_layers = sorted(losses.topk(3).indices.tolist())
    assert losses.argmin().item() not in kept_layers
    D, old = config.head_dim, model.state_dict()
    for new_i, old_i in enumerate(kept_layers):
        new, p = f"blocks.{new_i}.", f"blocks.{old_i}."
        group_scores = stats.group_importance(model, old_i)
        groups = sorted(group_scores.topk(2).indices.tolist())
        heads = [g * 2 + j for g in groups for j in range(2)]
        q, k, v = old[p + "attn.qkv.weight"].split([6 * D, 3 * D, 3 * D])
        expect_qkv = torch.cat([torch.cat([q[h * D:(h + 1) * D] for h in heads]),
                                torch.cat([k[g * D:(g + 1) * D] for g in groups]),
                                torch.cat([v[g * D:(g + 1) * D] for g in groups])])
        assert torch.equal(pruned.state_dict()[new + "attn.qkv.weight"], expect_qkv)
        expect_proj = torch.cat([old[p + "attn.proj.weight"][:, h * D:(h + 1) * D] for h in heads], dim=1)
        assert torch.equal(pruned.state_dict()[new + "attn.proj.weight"], expect_proj)
        channels = sorted(stats.channel_importance(model, old_i).topk(40).indices.tolist())
        gate, up = old[p + "mlp.gate_up.weight"].chunk(2)
        assert torch.equal(pruned.state_dict()[new + "mlp.gate_up.weight"], torch.cat([gate[channels], up[channels]]))
        assert torch.equal(pruned.state_dict()[new + "mlp.proj.weight"], old[p + "mlp.proj.weight"][:, channels])
        assert torch.equal(pruned.state_dict()[new + "attn_norm.weight"], old[p + "attn_norm.weight"])
    assert torch.equal(pruned.embed.weight, model.embed.weight)


def test_a_group_that_contributes_nothing_is_the_one_removed(tok, calib):
    config = llama(tok.vocab_size, n_layer=1)
    model = perturbed(config)
    D = config.head_dim
    with torch.no_grad():   # KV group 1's values are zero: its three query heads add nothing
        model.blocks[0].attn.qkv.weight[(6 + 3 + 1) * D:(6 + 3 + 2) * D] = 0
    stats = calibrate.collect_stats(model, windows(tok, calib))
    assert stats.group_importance(model, 0).argmin().item() == 1
    pruned = structured.prune_structured(model, structured.Sizes(1, 4, 64), stats)
    with torch.no_grad():    # the model is unchanged by removing it
        x = windows(tok, calib)[:2]
        torch.testing.assert_close(pruned(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)


def _hf_logits(path, ids, **kwargs):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return ref(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pruned_model_saves_loads_and_exports_to_transformers(tok, calib, tmp_path, monkeypatch, capsys, family):
    config = llama(tok.vocab_size) if family == "llama" else gpt2(tok.vocab_size)
    save_checkpoint(tmp_path / "orig", perturbed(config), tok)
    # GPT-2's HF layout has no head_dim of its own, so heads stay; layers and channels go
    args = ["--layers", "3", "--mlp", "48"] + (["--heads", "4"] if family == "llama" else [])
    code, out, err = run_cli(monkeypatch, capsys, "prune", tmp_path / "orig", "--out", tmp_path / "pruned",
                             "--calib", calib, "--calib-tokens", "256", *args)
    assert code == 0, err
    model, _ = load_checkpoint(tmp_path / "pruned")
    assert model.config.n_layer == 3 and model.config.intermediate_size == 48
    if family == "llama":
        assert (model.config.n_head, model.config.n_kv_head, model.config.head_dim) == (4, 2, 8)
    assert f"-> {structured.count_params(model.config):,} parameters" in out
    code, _, err = run_cli(monkeypatch, capsys, "convert", tmp_path / "pruned", tmp_path / "hf", "--to", "hf")
    assert code == 0, err
    ids = torch.randint(0, tok.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)[0]
    torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), ours, atol=1e-4, rtol=0)
    if family == "llama":  # GGUF too (GPT-2's is not a format llmkit writes): transformers reads it back
        code, _, err = run_cli(monkeypatch, capsys, "convert", tmp_path / "pruned", tmp_path / "gguf" / "m.gguf",
                               "--to", "gguf", "--type", "f32")
        assert code == 0, err
        torch.testing.assert_close(_hf_logits(tmp_path / "gguf", ids, gguf_file="m.gguf"), ours, atol=1e-4, rtol=0)
    code, out, err = run_cli(monkeypatch, capsys, "generate", "--model", tmp_path / "pruned", "the cat",
                             "--max-new-tokens", "4", "--temperature", "0")
    assert code == 0 and out.startswith("the cat"), err


def test_params_target_solves_the_mlp_width():
    config = preset("smollm2-135m")
    sizes = structured.plan_sizes(config, params=90_000_000, layers=24)
    assert (sizes.layers, sizes.heads) == (24, 9) and sizes.mlp % 64 == 0
    assert structured.count_params(structured.pruned_config(config, sizes)) <= 90_000_000
    wider = structured.Sizes(24, 9, sizes.mlp + 64)
    assert structured.count_params(structured.pruned_config(config, wider)) > 90_000_000


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.0"], "--sparsity must be a number in [0, 1), got 1.0"),
    (["--sparsity", "-0.1"], "--sparsity must be a number in [0, 1), got -0.1"),
    (["--params", "5M", "--calib", "CALIB"], "--params 5,000,000 is not smaller than the model"),
    (["--layers", "9", "--calib", "CALIB"], "--layers 9 is larger than the model (4)"),
    (["--heads", "0", "--calib", "CALIB"], "--heads 0 would prune every attention head of a layer"),
    (["--heads", "3", "--calib", "CALIB"], "--heads 3 must be a multiple of 2"),
    (["--mlp", "32"], "give --calib FILE"),
    (["--sparsity", "0.5", "--layers", "2"], "not both or neither"),
    (["--params", "lots", "--calib", "CALIB"], "--params must be a number like 90M"),
    (["--pattern", "4:2"], "--pattern must be N:M with 0 < N < M"),
])
def test_bad_input_is_one_clear_line(tok, calib, tmp_path, monkeypatch, capsys, args, message):
    save_checkpoint(tmp_path / "orig", perturbed(llama(tok.vocab_size, n_head=4, n_kv_head=2)), tok)
    args = [str(calib) if a == "CALIB" else a for a in args]
    code, out, err = run_cli(monkeypatch, capsys, "prune", tmp_path / "orig", "--out", tmp_path / "out", *args)
    assert code == 1 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_sparsity_check_in_the_library():
    with pytest.raises(LlmkitError, match=r"sparsity must be in \[0, 1\)"):
        prune_unstructured(perturbed(llama(300)), math.nan)


def test_pruned_model_recovers_by_distillation_from_the_original(tmp_path, monkeypatch, capsys):
    from llmkit.tokenizer import Tokenizer

    data = make_data_dir(tmp_path)
    tok = Tokenizer.load(data / "tokenizer.json")
    save_checkpoint(tmp_path / "orig", perturbed(llama(tok.vocab_size, n_layer=3)), tok)
    code, _, err = run_cli(monkeypatch, capsys, "prune", tmp_path / "orig", "--out", tmp_path / "pruned",
                           "--calib", tmp_path / "corpus.txt", "--calib-tokens", "256", "--layers", "2", "--mlp", "32")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "distill", "--teacher", tmp_path / "orig", "--student",
                             tmp_path / "pruned", "--data", data, "--out", tmp_path / "recovered", "--max-steps", "3",
                             "--top-k", "4", "block_size=16", "batch_size=4", "progress=false", "eval_iters=1",
                             "peak_flops=1e11")
    assert code == 0, err
    recovered, _ = load_checkpoint(tmp_path / "recovered")
    assert (recovered.config.n_layer, recovered.config.intermediate_size) == (2, 32)
    pruned, _ = load_checkpoint(tmp_path / "pruned")
    assert not torch.equal(recovered.blocks[0].mlp.proj.weight, pruned.blocks[0].mlp.proj.weight)  # it trained
