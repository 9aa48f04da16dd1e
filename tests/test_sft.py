"""SFT data (assistant-only labels, truncation, padding/packing, sampler resume) and the SFT trainer."""
import pytest
import torch
from conftest import tiny_decoder, tiny_model_dir, tiny_tokenizer, write_jsonl

from llmkit.io.checkpoint import load_checkpoint
from llmkit.errors import LlmkitError
from llmkit.model.lora import ADAPTER_CONFIG, LoRAConfig, lora_modules
from llmkit.data.chats import IGNORE, SFTData, SFTSampler, collate, encode_chat, encode_chats, pack, read_chats

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of zorbia?"},
        {"role": "assistant", "content": "quibble"}, {"role": "user", "content": "and of yonder?"},
        {"role": "assistant", "content": "frobnitz"}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_labels_cover_exactly_the_assistant_turns(tok):
    ids, labels = encode_chat(tok, CHAT)
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, add_generation_prompt=False)
    targets = tok.decode([t for t in labels if t != IGNORE])
    assert targets == "quibble<|end|>\nfrobnitz<|end|>\n"
    # every labelled token is its own id; nothing of the system/user turns is a target
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    prompt_part = tok.apply_chat_template(CHAT[:2], add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt_part))
    assert all(lab == IGNORE for lab in labels[:n_prompt])


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "chats.jsonl:2: malformed JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "chats.jsonl:2: conversation has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "chats.jsonl:2: message 0 has unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "chats.jsonl:2: conversation starts with an assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "chats.jsonl:2: message 0 content must be a string"),
    ({"conversation": []}, "chats.jsonl:2: expected"),
])
def test_bad_chat_lines_name_file_and_line(tmp_path, line, message):
    good = {"messages": CHAT[1:3]}
    path = write_jsonl(tmp_path / "chats.jsonl", [good, line, good])
    with pytest.raises(LlmkitError, match=message):
        read_chats(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LlmkitError, match="cannot read chat data"):
        read_chats(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LlmkitError, match="is empty"):
        read_chats(tmp_path / "empty.jsonl")


def test_truncation_is_reported_and_targetless_rows_dropped(tok):
    long_chat = [{"role": "user", "content": "zorbia " * 30}, {"role": "assistant", "content": "quibble"}]
    data = encode_chats(tok, [CHAT, long_chat, CHAT[1:3]], max_tokens=24)
    assert data.stats["truncated"] >= 1 and data.stats["dropped"] == 1
    assert data.stats["examples"] == 2 and len(data) == 2
    assert all(len(ids) <= 24 for ids, _ in data.examples)
    with pytest.raises(LlmkitError, match="no conversation keeps an assistant token"):
        encode_chats(tok, [long_chat], max_tokens=10)


def test_right_padding_changes_nothing_for_real_tokens(tok):
    """Causal attention: a padded batch gives each row the loss it has alone, mask or no mask."""
    model = tiny_decoder(tok.vocab_size).eval()
    examples = [encode_chat(tok, CHAT), encode_chat(tok, CHAT[1:3])]
    x, y, mask = collate(examples, pad_id=tok.pad_id)
    assert x.shape == (2, len(examples[0][0]) - 1)
    assert mask.sum(1).tolist() == [len(e[0]) - 1 for e in examples]
    assert (y[~mask] == IGNORE).all()
    logits_plain, _ = model(x)
    logits_masked, _ = model(x, attn_mask=mask)
    torch.testing.assert_close(logits_plain[mask], logits_masked[mask], atol=1e-5, rtol=0)
    for row, (ids, _) in enumerate(examples):
        alone, _ = model(torch.tensor([ids[:-1]]))
        torch.testing.assert_close(logits_plain[row, :len(ids) - 1], alone[0], atol=1e-5, rtol=0)


def test_packing_keeps_every_example_within_rows(tok):
    examples = [encode_chat(tok, CHAT[1:3])] * 7 + [encode_chat(tok, CHAT)]
    rows = pack(examples, 40)
    longest = max(len(ids) for ids, _ in examples)
    assert all(len(ids) <= max(40, longest) for ids, _ in rows)
    assert sum(len(ids) for ids, _ in rows) == sum(len(ids) for ids, _ in examples)
    assert len(rows) < len(examples)


@pytest.mark.parametrize("pack_rows", [False, True])
def test_sampler_resumes_exactly_and_splits_ranks(tok, pack_rows):
    data = SFTData([encode_chat(tok, CHAT[1:3])] * 5 + [encode_chat(tok, CHAT)] * 4)
    a = SFTSampler(data, 32, 4, seed=3, pack_rows=pack_rows)
    for _ in range(3):
        a.next_batch()
    b = SFTSampler(data, 32, 4, seed=3, pack_rows=pack_rows)
    b.load_state_dict(a.state_dict())
    for _ in range(5):  # crosses an epoch boundary
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    whole = SFTSampler(data, 32, 4, seed=3, pack_rows=pack_rows).next_batch()[0]
    r0 = SFTSampler(data, 32, 4, seed=3, pack_rows=pack_rows, rank=0, world_size=2).next_batch()[0]
    r1 = SFTSampler(data, 32, 4, seed=3, pack_rows=pack_rows, rank=1, world_size=2).next_batch()[0]
    assert r0.shape[0] == r1.shape[0] == 2
    for part, rows in ((r0, whole[:2]), (r1, whole[2:])):
        w = min(part.shape[1], rows.shape[1])  # each rank pads to its own longest row
        assert torch.equal(part[:, :w], rows[:, :w])


# ---- the trainer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tok):
    return tiny_model_dir(tmp_path_factory.mktemp("base") / "model", tok)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rows = [{"messages": [{"role": "user", "content": f"capital of zorbia {i}?"},
                          {"role": "assistant", "content": "quibble"}]} for i in range(24)]
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", rows)


def sft(base_dir, chats, out, steps, lora=True, resume=False, **kw):
    from llmkit.train.sft import SFTTrainer
    from llmkit.train.config import TrainConfig

    cfg = TrainConfig(data_dir=str(chats), out_dir=str(out), block_size=32, batch_size=4, max_steps=steps,
                      lr=1e-2, warmup_steps=1, eval_interval=0, ckpt_interval=2, log_interval=1, progress=False,
                      lr_decay_steps=1000,  # a flat rate after warmup, as these runs were tuned for
                      threads=1)
    return SFTTrainer(cfg, model=str(base_dir), lora=LoRAConfig(rank=4) if lora else None, resume=resume,
                      log=lambda *_: None, **kw)


def test_lora_sft_resumes_exactly_and_writes_adapter_and_merged_model(tmp_path, base_dir, chats):
    straight = sft(base_dir, chats, tmp_path / "a", 4)
    assert straight.trainable[0] < 0.1 * straight.trainable[1]
    metrics = straight.fit()
    assert metrics["tokens"] == straight.tokens_seen and metrics["tokens"] < 4 * 4 * 32  # real widths counted
    sft(base_dir, chats, tmp_path / "b", 2).fit()
    resumed = sft(base_dir, chats, tmp_path / "b", 4, resume=True)
    assert resumed.step == 2
    resumed.fit()
    for name, module in lora_modules(straight.raw_model).items():
        other = lora_modules(resumed.raw_model)[name]
        torch.testing.assert_close(module.lora_B, other.lora_B, atol=1e-6, rtol=0)
    out = tmp_path / "a"
    assert (out / ADAPTER_CONFIG).exists() and (out / "train_state.pt").exists()
    merged, tokenizer = load_checkpoint(out)  # the merged model loads like any model dir
    assert tokenizer.chat_template is not None
    x = torch.randint(0, tokenizer.vocab_size, (2, 12))
    torch.testing.assert_close(merged(x)[0], straight.raw_model.eval()(x)[0], atol=1e-5, rtol=0)


def test_adapter_dir_resolves_to_its_base_with_the_adapter_merged(tmp_path, base_dir, chats):
    """--model accepts an adapter directory alone: resolve_model loads the base it names and merges it."""
    import shutil

    from llmkit.io.resolve import resolve_model
    from llmkit.model.lora import ADAPTER_WEIGHTS

    trainer = sft(base_dir, chats, tmp_path / "run", 2)
    trainer.fit()
    adapter_only = tmp_path / "adapter"
    adapter_only.mkdir()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy(tmp_path / "run" / name, adapter_only / name)
    model, _ = resolve_model(adapter_only)
    assert not lora_modules(model)
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    torch.testing.assert_close(model(x)[0], trainer.raw_model.eval()(x)[0], atol=1e-5, rtol=0)
    (adapter_only / ADAPTER_CONFIG).write_text('{"lora": {"rank": 4}, "modules": []}')
    with pytest.raises(LlmkitError, match="does not name its base model"):
        resolve_model(adapter_only)


def test_full_sft_learns_the_reply(tmp_path, base_dir, chats):
    trainer = sft(base_dir, chats, tmp_path / "full", 12, lora=False, val_fraction=0.25)
    metrics = trainer.fit()
    assert metrics["val_loss"] < 1.0  # started near log(vocab) ~ 5.8
    model, tokenizer = load_checkpoint(tmp_path / "full")
    from llmkit.infer.generate import generate

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "capital of zorbia 99?"}])
    assert generate(model, tokenizer, prompt, max_new_tokens=6, temperature=0).startswith("quibble")


def test_bad_data_fails_before_anything_is_written(tmp_path, base_dir):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(LlmkitError, match="bad.jsonl:1: conversation has no assistant turn"):
        sft(base_dir, bad, tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()


def test_resume_with_another_rank_is_refused(tmp_path, base_dir, chats):
    sft(base_dir, chats, tmp_path / "r", 2).fit()
    from llmkit.train.sft import SFTTrainer
    from llmkit.train.config import TrainConfig

    cfg = TrainConfig(data_dir=str(chats), out_dir=str(tmp_path / "r"), block_size=32, batch_size=4, max_steps=4,
                      progress=False)
    with pytest.raises(LlmkitError, match=r"has shape \(4, 48\), the model needs \(8, 48\)"):
        SFTTrainer(cfg, model=str(base_dir), lora=LoRAConfig(rank=8), resume=True, log=lambda *_: None)


def test_cli_finetune_sft_lora_and_bad_input(tmp_path, monkeypatch, capsys, base_dir, chats):
    from conftest import run_cli

    out = tmp_path / "cli"
    code, stdout, err = run_cli(monkeypatch, capsys, "finetune", "--task", "sft", "--model", base_dir,
                                "--data", chats, "--out", out, "--lora", "--lora-rank", "2",
                                "--lora-targets", "qkv,proj", "--max-steps", "3", "--block-size", "32",
                                "--batch-size", "4", "--lr", "1e-3", "--pack", "--set", "grad_accum=2",
                                "--set", "progress=false")
    assert code == 0, err
    assert "trainable parameters:" in err and "saved to" in stdout
    assert (out / ADAPTER_CONFIG).exists() and (out / "model.safetensors").exists()
    bad = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                               {"role": "wizard", "content": "b"}]}])
    code, _, err = run_cli(monkeypatch, capsys, "finetune", "--task", "sft", "--model", base_dir, "--data", bad,
                           "--out", tmp_path / "never")
    assert code == 1 and "roles.jsonl:1: message 1 has unknown role 'wizard'" in err
    code, _, err = run_cli(monkeypatch, capsys, "finetune", "--task", "sft", "--model", base_dir, "--data", chats,
                           "--out", tmp_path / "never", "--block-size", "32", "--lora", "--lora-targets", "q_proj")
    assert code == 1 and "'q_proj' matches no linear layer" in err
    assert not (tmp_path / "never").exists()
