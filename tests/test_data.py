"""Corpus preparation (streaming, splits, EOS, dtype, errors) and the window sampler."""
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmkit.data.corpus import (RandomWindowSampler, _cut_point, _split_long, _text_pieces, choose_dtype,
                         iter_texts, load_split, prepare)
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from conftest import shared_file

VOCAB = "alpha beta gamma delta  x-ray 12 345 , . ! ? ' \n \n\n über ölig 漢字 ok".split(" ")


def make_docs(n, seed=0, words=(5, 40)):
    rng = random.Random(seed)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(*words))) for _ in range(n)]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train_bpe(make_docs(200, seed=1), vocab_size=320)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.train_char(make_docs(200, seed=1))


def read_bin(out, split, dtype=np.uint16):
    return np.fromfile(out / f"{split}.bin", dtype=dtype).tolist()


def test_single_text_file_splits_tail_like_nanogpt(bpe, tmp_path):
    text = "\n".join(make_docs(50, seed=2))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "one.txt"], tmp_path / "out", bpe, val_fraction=0.1)
    ids = bpe.encode(text) + [bpe.eos_id]
    n_train = int(len(ids) * 0.9)
    assert read_bin(tmp_path / "out", "train") == ids[:n_train]
    assert read_bin(tmp_path / "out", "val") == ids[n_train:]
    saved = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert saved == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == bpe.vocab_size
    assert (meta["train_tokens"], meta["val_tokens"], meta["documents"]) == (n_train, len(ids) - n_train, 1)
    assert meta["split_by"] == "tokens" and meta["sources"] == [str(tmp_path / "one.txt")]
    assert Tokenizer.load(tmp_path / "out" / meta["tokenizer"]).encode(text) == bpe.encode(text)
    np.testing.assert_array_equal(load_split(tmp_path / "out", "val"), ids[n_train:])
    assert load_split(tmp_path / "out", "train").dtype == np.uint16


def test_documents_are_separated_by_eos(char, tmp_path):
    docs = make_docs(30, seed=3)
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "b.jsonl", docs[:20])
    (tmp_path / "a" / "c.txt").write_text(docs[20])
    (tmp_path / "a" / "ignored.md").write_text("not a corpus file")
    (tmp_path / "z.txt").write_text(docs[21])
    write_jsonl(tmp_path / "y.jsonl", docs[22:])
    (tmp_path / "empty.txt").write_text("")  # no text: not a document
    inputs = [tmp_path / "a", tmp_path / "z.txt", tmp_path / "empty.txt", tmp_path / "y.jsonl"]
    meta = prepare(inputs, tmp_path / "out", char, val_fraction=0.0)
    expected = [i for d in docs for i in char.encode(d) + [char.eos_id]]
    assert read_bin(tmp_path / "out", "train") == expected
    assert meta["val_tokens"] == 0 and len(load_split(tmp_path / "out", "val")) == 0
    assert meta["documents"] == 30 and meta["split_by"] == "documents"
    assert [Path(s).name for s in meta["sources"]] == ["b.jsonl", "c.txt", "z.txt", "empty.txt", "y.jsonl"]


def test_document_split_is_deterministic_and_sized(char, tmp_path):
    docs = make_docs(400, seed=4)
    write_jsonl(tmp_path / "docs.jsonl", docs)
    runs = [prepare([tmp_path / "docs.jsonl"], tmp_path / f"out{i}", char, val_fraction=0.2, seed=seed)
            for i, seed in enumerate((7, 7, 8))]
    assert read_bin(tmp_path / "out0", "val") == read_bin(tmp_path / "out1", "val")
    assert read_bin(tmp_path / "out0", "val") != read_bin(tmp_path / "out2", "val")
    for i, meta in enumerate(runs):
        assert 40 <= meta["val_documents"] <= 120 and meta["train_documents"] + meta["val_documents"] == 400
        train, val = read_bin(tmp_path / f"out{i}", "train"), read_bin(tmp_path / f"out{i}", "val")
        assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
        assert val.count(char.eos_id) == meta["val_documents"] and val[-1] == char.eos_id
        # Every document lands whole in exactly one split.
        seen = sorted(char.decode(train + val).split("<|eos|>")[:-1])
        assert seen == sorted(docs)


def test_val_never_empty_with_two_documents(char, tmp_path):
    docs = ["first document here", "second one"]
    write_jsonl(tmp_path / "two.jsonl", docs)
    meta = prepare([tmp_path / "two.jsonl"], tmp_path / "out", char, val_fraction=0.01)
    assert (meta["train_documents"], meta["val_documents"]) == (1, 1)
    assert read_bin(tmp_path / "out", "train") == char.encode(docs[0]) + [char.eos_id]
    assert read_bin(tmp_path / "out", "val") == char.encode(docs[1]) + [char.eos_id]


def test_streaming_in_small_chunks_matches_whole_encoding(bpe, tmp_path, monkeypatch):
    """A multi-MB corpus goes through encode_batch in bounded pieces, with identical ids."""
    big = "\n".join(make_docs(20_000, seed=5))  # ~1.6 MB, one text document
    (tmp_path / "big.txt").write_text(big, encoding="utf-8")
    docs = make_docs(500, seed=6, words=(1, 400))
    write_jsonl(tmp_path / "many.jsonl", docs)
    inputs = [tmp_path / "big.txt", tmp_path / "many.jsonl"]
    sizes = []
    original = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch",
                        lambda self, texts: sizes.append(sum(map(len, texts))) or original(self, texts))
    prepare(inputs, tmp_path / "small", bpe, val_fraction=0.0, chunk_chars=4096, batch_chars=16384)
    assert len(sizes) > 80 and max(sizes) < 16384 + 5 * 4096
    monkeypatch.setattr(Tokenizer, "encode_batch", original)
    expected = [i for d in [big, *docs] for i in bpe.encode(d) + [bpe.eos_id]]
    assert read_bin(tmp_path / "small", "train") == expected


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab 1.\n\t'é漢")), max_size=300),
       size=st.integers(1, 40))
def test_cut_points_do_not_change_tokenization(bpe, text, size):
    cut = _cut_point(text)
    if cut:
        assert bpe.encode(text[:cut]) + bpe.encode(text[cut:]) == bpe.encode(text)
    pieces = list(_split_long(text, size))
    assert "".join(pieces) == text and all(pieces) and max(map(len, pieces), default=0) <= 4 * size


def test_text_reader_chunks_spaceless_text_and_multibyte_boundaries(tmp_path):
    text = "漢字ö" * 5000  # no spaces, multi-byte characters split across read chunks
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    pieces = list(_text_pieces(tmp_path / "t.txt", chunk_chars=100))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 500
    assert "".join(iter_texts([tmp_path], chunk_chars=100)) == text


def test_dtype_choice(tmp_path):
    assert choose_dtype(65536) == "uint16" and choose_dtype(65537) == "uint32"
    assert choose_dtype(100, "uint32") == "uint32"
    with pytest.raises(LlmkitError, match="does not fit in uint16"):
        choose_dtype(70000, "uint16")
    with pytest.raises(LlmkitError, match="unsupported token dtype"):
        choose_dtype(100, "int8")
    # A real vocabulary past 65536 ids stores uint32 and keeps the large ids intact.
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 20000)) + "".join(
        chr(c) for c in range(0x10000, 0x10000 + 50000))
    wide = Tokenizer.train_char([chars])
    text = chars[-50:] + " " + chars[:50]
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    meta = prepare([tmp_path / "wide.txt"], tmp_path / "out", wide, val_fraction=0.0)
    assert meta["dtype"] == "uint32"
    assert load_split(tmp_path / "out", "train").tolist() == wide.encode(text) + [wide.eos_id]
    assert max(wide.encode(text)) > 65535
    with pytest.raises(LlmkitError, match="does not fit in uint16"):
        prepare([tmp_path / "wide.txt"], tmp_path / "out16", wide, dtype="uint16")


def test_input_errors(char, tmp_path):
    def fails(inputs, match, **kw):
        with pytest.raises(LlmkitError, match=match):
            prepare(inputs, tmp_path / "out", char, **kw)
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out.*"))  # no scratch directory left behind

    fails([tmp_path / "missing.txt"], "no such file or directory: .*missing.txt")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    fails([tmp_path / "empty.txt", tmp_path / "emptydir"], "empty corpus")
    (tmp_path / "latin1.txt").write_bytes(b"ok " * 50 + b"caf\xe9 " + b"more " * 30)
    fails([tmp_path / "latin1.txt"], r"latin1.txt: not UTF-8 .*offset 153\)", chunk_chars=16)
    (tmp_path / "cut.txt").write_bytes("ab ü".encode()[:-1])  # truncated multi-byte character
    fails([tmp_path / "cut.txt"], r"cut.txt: not UTF-8 .*offset 3\)")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n\n{"text": "broken\n')
    fails([tmp_path / "bad.jsonl"], r"bad.jsonl:3: malformed JSON")
    (tmp_path / "notext.jsonl").write_text('{"text": "fine"}\n{"content": "x"}\n')
    fails([tmp_path / "notext.jsonl"], r'notext.jsonl:2: no "text" string field')
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    fails([tmp_path / "bytes.jsonl"], r"bytes.jsonl:2: not UTF-8 .*offset 24\)")
    (tmp_path / "data.csv").write_text("a,b")
    fails([tmp_path / "data.csv"], "unsupported file type")
    (tmp_path / "fine.txt").write_text("some text")
    fails([tmp_path / "fine.txt"], "val fraction", val_fraction=1.0)
    no_eos = Tokenizer.train_char(["abc"], special_tokens=[])
    with pytest.raises(LlmkitError, match="no EOS"):
        prepare([tmp_path / "fine.txt"], tmp_path / "out", no_eos)


def test_failure_keeps_previous_output(char, tmp_path):
    (tmp_path / "fine.txt").write_text("some text to keep around")
    prepare([tmp_path / "fine.txt"], tmp_path / "out", char)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    write_jsonl(tmp_path / "more.jsonl", ["x y z"] * 3)
    with open(tmp_path / "more.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(LlmkitError, match="malformed JSON"):
        prepare([tmp_path / "more.jsonl"], tmp_path / "out", char)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # A successful run over an existing directory replaces its files.
    meta = prepare([tmp_path / "fine.txt", tmp_path / "fine.txt"], tmp_path / "out", char)
    assert meta["documents"] == 2 and json.loads((tmp_path / "out" / "meta.json").read_text()) == meta


def test_load_split_errors(char, tmp_path):
    with pytest.raises(LlmkitError, match="not a prepared data directory"):
        load_split(tmp_path, "train")
    (tmp_path / "t.txt").write_text("hello there world")
    prepare([tmp_path / "t.txt"], tmp_path / "out", char)
    with pytest.raises(LlmkitError, match="unknown split"):
        load_split(tmp_path / "out", "test")
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(LlmkitError, match="re-run prepare"):
        load_split(tmp_path / "out", "train")
    (tmp_path / "out" / "meta.json").write_text('{"dtype": "float32", "train_tokens": 1, "val_tokens": 1}')
    with pytest.raises(LlmkitError, match="corrupt .*meta.json"):
        load_split(tmp_path / "out", "val")
    (tmp_path / "out" / "meta.json").write_text("{")
    with pytest.raises(LlmkitError, match="corrupt .*meta.json"):
        load_split(tmp_path / "out", "val")


TOKENS = np.arange(1000, dtype=np.uint16) * 7 % 1000


def draw(sampler, steps):
    return [sampler.next_batch() for _ in range(steps)]


def test_sampler_windows_and_determinism():
    batches = draw(RandomWindowSampler(TOKENS, 16, 4, seed=3), 5)
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row, target in zip(x, y):  # every row is a real window of the data
            start = int(np.flatnonzero(TOKENS == int(row[0]))[0])
            assert row.tolist() == TOKENS[start:start + 16].tolist()
            assert target.tolist() == TOKENS[start + 1:start + 17].tolist()
    again = draw(RandomWindowSampler(TOKENS, 16, 4, seed=3), 5)
    other = draw(RandomWindowSampler(TOKENS, 16, 4, seed=4), 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))
    # Windows reach both ends of the data: the last valid start is len - block_size - 1.
    starts = {int(x[0, 0]) for x, _ in draw(RandomWindowSampler(np.arange(20), 16, 1, seed=0), 300)}
    assert starts == {0, 1, 2, 3}


def test_sampler_resume_replays_next_batches(tmp_path):
    sampler = RandomWindowSampler(TOKENS, 8, 3, seed=11)
    draw(sampler, 3)
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    expected = draw(sampler, 4)
    resumed = RandomWindowSampler(TOKENS, 8, 3, seed=999)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.steps == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(expected, draw(resumed, 4)))
    with pytest.raises(LlmkitError, match="invalid sampler state"):
        resumed.load_state_dict({"steps": 1})


def test_ranks_together_see_the_single_process_batch():
    single = draw(RandomWindowSampler(TOKENS, 8, 6, seed=5), 4)
    ranks = [draw(RandomWindowSampler(TOKENS, 8, 2, seed=5, rank=r, world_size=3), 4) for r in range(3)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(3)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(3)]), y)
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])


def test_sampler_errors():
    with pytest.raises(LlmkitError, match="fewer than block_size"):
        RandomWindowSampler(np.arange(16), 16, 2, seed=0)
    RandomWindowSampler(np.arange(17), 16, 2, seed=0).next_batch()  # exactly block_size+1 is enough
    with pytest.raises(LlmkitError, match="rank 2 is outside"):
        RandomWindowSampler(TOKENS, 8, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(LlmkitError, match="must be >= 1"):
        RandomWindowSampler(TOKENS, 8, 0, seed=0)


def test_tinyshakespeare_char_prepare_matches_nanogpt_sizes(tmp_path):
    tok = Tokenizer.train_char(iter_texts([shared_file("tinyshakespeare.txt")]))
    meta = prepare([shared_file("tinyshakespeare.txt")], tmp_path / "shakespeare", tok)
    # nanoGPT's shakespeare_char: 1,003,854 train and 111,540 val tokens (we add one EOS).
    assert (meta["train_tokens"], meta["val_tokens"]) == (int(1115395 * 0.9), 1115395 - int(1115395 * 0.9))
    assert load_split(tmp_path / "shakespeare", "train")[:5].tolist() == [18, 47, 56, 57, 58]


def test_cli_prepare_trains_tokenizer_and_writes_data(tmp_path, monkeypatch, capsys):
    from llmkit.cli import main

    write_jsonl(tmp_path / "docs.jsonl", make_docs(60, seed=9))
    for kind, extra in (("bpe", ["--vocab-size", "300"]), ("char", [])):
        out = tmp_path / kind
        monkeypatch.setattr("sys.argv", ["llmkit", "prepare", str(tmp_path / "docs.jsonl"), "--out", str(out),
                                         "--tokenizer", kind, *extra, "--val-fraction", "0.2", "--seed", "3"])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert exit_.value.code in (0, None)
        meta = json.loads((out / "meta.json").read_text())
        assert meta["documents"] == 60 and meta["val_documents"] > 0 and meta["seed"] == 3
        assert f"60 documents -> {meta['train_tokens']:,} train" in capsys.readouterr().out
    assert json.loads((tmp_path / "bpe" / "meta.json").read_text())["vocab_size"] == 300
    # Reusing a tokenizer file gives the same data.
    monkeypatch.setattr("sys.argv", ["llmkit", "prepare", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "re"),
                                     "--tokenizer", str(tmp_path / "char" / "tokenizer.json"),
                                     "--val-fraction", "0.2", "--seed", "3"])
    with pytest.raises(SystemExit):
        main()
    assert (tmp_path / "re" / "val.bin").read_bytes() == (tmp_path / "char" / "val.bin").read_bytes()


def test_cli_prepare_error_is_one_line(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "nope.txt"
    proc = subprocess.run([sys.executable, "-m", "llmkit.cli", "prepare", str(missing), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: no such file or directory: {missing}"
    assert not (tmp_path / "o").exists()
