"""Distillation: the loss, top-k teacher targets, the trainer and the CLI, vocab mismatches."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_data_dir, read_metrics, run_cli, tiny_config, tiny_model_dir

from llmkit.train.distill import DistillTrainer, TeacherTopK, TopK, distillation_loss, soft_cross_entropy
from llmkit.errors import LlmkitError
from llmkit.train.trainer import Trainer


def logits(seed, shape=(2, 5, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_loss_parts():
    s, t = logits(0), logits(1)
    y = torch.randint(0, 11, (2, 5))
    y[0, :2] = -100
    keep = y != -100
    hard = F.cross_entropy(s[keep], y[keep])
    torch.testing.assert_close(distillation_loss(s, t, y, alpha=0.0), hard)
    assert distillation_loss(t, t, y, alpha=1.0).abs() < 1e-6  # matching the teacher costs nothing
    # the soft term is T^2 * KL(teacher || student), checked against torch's own KL
    T = 3.0
    kl = F.kl_div(F.log_softmax(s[keep] / T, -1), F.log_softmax(t[keep] / T, -1), log_target=True,
                  reduction="batchmean")
    torch.testing.assert_close(distillation_loss(s, t, y, temperature=T, alpha=1.0), kl * T * T)
    mixed = distillation_loss(s, t, y, temperature=T, alpha=0.25)
    torch.testing.assert_close(mixed, 0.25 * kl * T * T + 0.75 * hard)


def test_top_k_with_every_token_equals_full_and_small_k_is_close():
    s, t = logits(2), logits(3)
    full = soft_cross_entropy(s.flatten(0, 1), t.flatten(0, 1), 2.0)
    top = t.topk(11, -1)
    same = soft_cross_entropy(s.flatten(0, 1), TopK(top.values.flatten(0, 1), top.indices.flatten(0, 1)), 2.0)
    torch.testing.assert_close(same, full)
    peaked = t * 4  # a confident teacher: its top 3 tokens hold nearly all the mass
    top3 = peaked.topk(3, -1)
    approx = soft_cross_entropy(s.flatten(0, 1), TopK(top3.values.flatten(0, 1), top3.indices.flatten(0, 1)), 1.0)
    exact = soft_cross_entropy(s.flatten(0, 1), peaked.flatten(0, 1), 1.0)
    assert (approx - exact).abs().mean() < 0.25 * exact.abs().mean()


def test_student_moves_towards_teacher():
    t = logits(4)
    s = torch.zeros_like(t, requires_grad=True)
    y = t.argmax(-1)
    opt = torch.optim.SGD([s], lr=5.0)
    first = None
    for _ in range(30):
        loss = distillation_loss(s, t, y, temperature=1.0, alpha=1.0)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first


def test_vocab_mismatch_in_the_loss():
    with pytest.raises(LlmkitError, match="teacher vocabulary \\(12\\) does not match the student's \\(11\\)"):
        distillation_loss(logits(0), logits(1, (2, 5, 12)), torch.zeros(2, 5, dtype=torch.long))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("distill"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("teacher") / "model"
    Trainer(tiny_config(data_dir, out, model={"n_embd": 48}, max_steps=30, eval_interval=0)).fit()
    return out


@pytest.mark.parametrize("top_k", [None, 4])
def test_trainer_distills_and_validates_on_plain_cross_entropy(tmp_path, data_dir, teacher_dir, top_k):
    from llmkit.io.checkpoint import load_checkpoint

    teacher, tok = load_checkpoint(teacher_dir)
    config = tiny_config(data_dir, tmp_path / "student", model={"n_embd": 16}, max_steps=6, eval_interval=3)
    trainer = DistillTrainer(config, teacher, tok, temperature=2.0, alpha=0.7, top_k=top_k)
    if top_k:
        assert trainer.teacher_cache.values.shape[-1] == top_k
    metrics = trainer.fit()
    assert math.isfinite(metrics["loss"]) and "val_loss" in metrics
    assert not any(p.requires_grad for p in teacher.parameters())
    x, y = trainer._sampler(trainer.val_tokens, 0).next_batch()
    student = trainer.raw_model.eval()
    with torch.no_grad():
        assert trainer.compute_loss(x, y).item() == pytest.approx(student(x, targets=y)[1].item())
    student, _ = load_checkpoint(tmp_path / "student")
    assert student.config.n_embd == 16


def test_cli_distill_and_vocab_mismatch(tmp_path, monkeypatch, capsys, data_dir, teacher_dir):
    code, out, err = run_cli(monkeypatch, capsys, "distill", "--teacher", teacher_dir, "--student", "char-tiny",
                             "--data", data_dir, "--out", tmp_path / "s", "--max-steps", "3", "--top-k", "3",
                             "model.n_layer=1", "model.n_embd=16", "block_size=16", "batch_size=4",
                             "progress=false", "eval_iters=1", "peak_flops=1e11")
    assert code == 0, err
    assert "student saved to" in out and len(read_metrics(tmp_path / "s")) > 0
    other = tiny_model_dir(tmp_path / "bpe-teacher")  # a BPE tokenizer: another vocabulary
    code, out, err = run_cli(monkeypatch, capsys, "distill", "--teacher", other, "--student", "char-tiny",
                             "--data", data_dir, "--out", tmp_path / "never", "--max-steps", "2")
    assert code == 1 and "teacher vocab size" in err and "student vocab size" in err
    assert not (tmp_path / "never").exists()


def test_teacher_top_k_cache_covers_aligned_windows(data_dir, teacher_dir):
    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.data.corpus import load_split

    teacher, _ = load_checkpoint(teacher_dir)
    tokens = load_split(data_dir, "val")
    cache = TeacherTopK(teacher, tokens, block_size=16, k=5)
    assert len(cache) == (len(tokens) - 1) // 16
    x = torch.from_numpy(tokens[16:32].astype("int64"))[None]
    with torch.no_grad():
        top = teacher(x)[0].topk(5, -1)
    got = cache.lookup(torch.tensor([1]))
    assert torch.equal(got.indices.long(), top.indices)
    torch.testing.assert_close(got.values.float(), top.values, atol=1e-2, rtol=1e-2)


def test_teacher_cache_is_kept_for_a_resume_and_redone_for_another_teacher(tmp_path, data_dir, teacher_dir,
                                                                           monkeypatch):
    import llmkit.train.distill as distill
    from llmkit.io.checkpoint import load_checkpoint

    calls = []
    real = distill.teacher_logits
    monkeypatch.setattr(distill, "teacher_logits", lambda t, x: calls.append(len(x)) or real(t, x))
    teacher, tok = load_checkpoint(teacher_dir)
    out = tmp_path / "student"
    first = DistillTrainer(tiny_config(data_dir, out, model={"n_embd": 16}, max_steps=2, eval_interval=0),
                           teacher, tok, top_k=3)
    first.fit()
    assert calls and (out / distill.CACHE_FILE).exists()
    calls.clear()
    resumed = DistillTrainer(tiny_config(data_dir, out, model={"n_embd": 16}, max_steps=4, eval_interval=0),
                             teacher, tok, top_k=3, resume=True)
    assert not calls and resumed.step == 2                       # read back, not recomputed
    assert torch.equal(resumed.teacher_cache.indices, first.teacher_cache.indices)
    assert resumed.teacher_cache.seconds == pytest.approx(first.teacher_cache.seconds)
    with torch.no_grad():
        next(teacher.parameters())[0, 0] += 1.0                  # another teacher: its own targets
    DistillTrainer(tiny_config(data_dir, out, model={"n_embd": 16}, max_steps=4, eval_interval=0),
                   teacher, tok, top_k=3, resume=True)
    assert calls


def test_a_recovery_in_two_calls_ends_where_one_call_does(tmp_path, data_dir, teacher_dir):
    """The example's chunks: the second call resumes weights, optimizer, sampler and the LR schedule."""
    from llmkit.io.checkpoint import load_checkpoint

    teacher, tok = load_checkpoint(teacher_dir)

    def run(out, max_steps, resume=False):
        config = tiny_config(data_dir, out, model={"n_embd": 16}, max_steps=max_steps, lr_decay_steps=6,
                             eval_interval=0)
        DistillTrainer(config, teacher, tok, alpha=0.9, top_k=3, resume=resume).fit()
        return load_checkpoint(out)[0].state_dict()

    whole = run(tmp_path / "one", 6)
    run(tmp_path / "two", 3)
    chunked = run(tmp_path / "two", 6, resume=True)
    for name, tensor in whole.items():
        torch.testing.assert_close(chunked[name], tensor, rtol=0, atol=1e-6)
