"""Tokenizer: lossless round trips, batching, persistence, chat templates, errors."""
import json
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from llmkit.errors import LlmkitError
from llmkit.tokenizer import CHAT_TOKENS, DEFAULT_SPECIALS, Tokenizer
from conftest import shared_file

WORDS = ("the king said that we shall not go to war tomorrow , and the queen "
         "laughed ; über café naïve 東京 data 42 1999 :) don't it's").split()
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def corpus(n_lines=300, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(WORDS) + rng.choice(" \n ") for _ in range(rng.randint(3, 20)))
            for _ in range(n_lines)]


@pytest.fixture(scope="module")
def bpe():
    # A generator, not a list: training must accept a stream.
    return Tokenizer.train_bpe((line for line in corpus()), vocab_size=340)


@pytest.fixture(scope="module")
def char():
    return Tokenizer.train_char(line for line in corpus())


@HYPO
@given(text=st.text())
def test_bpe_roundtrip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@HYPO
@given(text=st.text())
def test_char_roundtrip_any_unicode(char, text):
    assert char.decode(char.encode(text)) == text


@HYPO
@given(texts=st.lists(st.text(max_size=40), max_size=6))
def test_batch_encoding_matches_single(bpe, char, texts):
    for tok in (bpe, char):
        assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_bpe_vocab_specials_and_byte_alphabet(bpe):
    assert bpe.vocab_size == 340  # the corpus supports more merges than that
    # Specials come first, in order, and are never split.
    assert [bpe.token_to_id(t) for t in DEFAULT_SPECIALS] == list(range(len(DEFAULT_SPECIALS)))
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.encode("<|end|>") == [bpe.token_to_id("<|end|>")]
    assert bpe.encode("hi", add_bos=True, add_eos=True) == [0, *bpe.encode("hi"), 1]
    assert bpe.stop_ids == sorted([bpe.eos_id, bpe.token_to_id("<|end|>")])
    # Frequent words become single tokens; text never seen still encodes (byte fallback).
    assert len(bpe.encode(" the")) == 1
    assert bpe.decode(bpe.encode("\x00\x7f\u2603")) == "\x00\x7f\u2603"
    assert bpe.decode(bpe.encode("a<|eos|>b"), skip_special=True) == "ab"


def test_char_ids_are_compact_sorted_characters(char):
    chars = sorted(set("".join(corpus())))
    assert [char.token_to_id(c) for c in chars] == list(range(len(chars)))
    assert char.token_to_id("<|bos|>") == len(chars)
    assert char.vocab_size == len(chars) + len(DEFAULT_SPECIALS) + 256
    # Unseen characters fall back to their UTF-8 bytes.
    ids = char.encode("ß😀")
    assert [char.id_to_token(i) for i in ids] == ["<0xC3>", "<0x9F>", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert char.encode("the") == [char.token_to_id(c) for c in "the"]


def test_char_on_tinyshakespeare_matches_nanogpt_ids():
    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = Tokenizer.train_char([text[i:i + 50_000] for i in range(0, len(text), 50_000)])
    # nanoGPT's shakespeare_char: 65 characters, "First Citizen" = 18 47 56 57 58 1 15 ...
    assert tok.token_to_id("<|bos|>") == 65
    assert tok.encode("First Citizen") == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47, 64, 43, 52]
    assert max(tok.encode(text)) == 64


def test_train_errors():
    with pytest.raises(LlmkitError, match="too small"):
        Tokenizer.train_bpe(["abc"], vocab_size=100)
    with pytest.raises(LlmkitError, match="no text"):
        Tokenizer.train_char(["", ""])


def test_save_load_roundtrip(bpe, char, tmp_path):
    text = "The king said: über 東京 <|end|> 42!\n"
    for tok, where in ((bpe, tmp_path / "bpe"), (char, tmp_path / "char" / "tokenizer.json")):
        path = tok.save(where)
        assert path.name == "tokenizer.json" and (path.parent / "tokenizer_config.json").exists()
        for source in (path, path.parent):  # a file or its directory
            back = Tokenizer.load(source)
            assert back.encode(text) == tok.encode(text)
            assert (back.bos_id, back.eos_id, back.pad_id, back.stop_ids, back.vocab_size) == \
                   (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.vocab_size)
            assert back.chat_template == tok.chat_template
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_bare_tokenizer_json_guesses_specials(bpe, tmp_path):
    bpe.hf.save(str(tmp_path / "tokenizer.json"))  # no tokenizer_config.json beside it
    back = Tokenizer.load(tmp_path)
    assert (back.bos_id, back.eos_id, back.pad_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    assert back.apply_chat_template([{"role": "user", "content": "x"}]) == "<|user|>\nx<|end|>\n<|assistant|>\n"


def test_load_errors(bpe, tmp_path):
    with pytest.raises(LlmkitError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(LlmkitError, match="no tokenizer file"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text('{"version": "1.0", "model": {')
    with pytest.raises(LlmkitError, match="corrupt tokenizer file .*bad"):
        Tokenizer.load(bad)
    good = bpe.save(tmp_path / "good")
    (good.parent / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(LlmkitError, match="tokenizer_config.json"):
        Tokenizer.load(good)
    (good.parent / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(LlmkitError, match="tokenizer_config.json.*<\\|nope\\|>"):
        Tokenizer.load(good)


def test_default_chat_template(bpe):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    expected = ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
                "<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n")
    assert bpe.apply_chat_template(messages, add_generation_prompt=False) == expected
    prompt = bpe.apply_chat_template(messages)
    assert prompt == expected + "<|assistant|>\n"
    ids = bpe.encode(prompt)
    assert all(bpe.token_to_id(t) in ids for t in CHAT_TOKENS)
    assert bpe.decode(ids) == prompt


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}], "role 'robot'"),
    ([{"role": 3, "content": "x"}], "role 3"),
    ([{"role": "user", "content": None}], "content must be a string"),
    ([{"role": "user"}], "content must be a string"),
    (["hello"], "not a dict"),
    ([], "non-empty list"),
    ([{"role": "tool", "content": "42"}], "no tool role"),
])
def test_chat_template_rejects_bad_messages(bpe, messages, match):
    with pytest.raises(LlmkitError, match=match):
        bpe.apply_chat_template(messages)


def test_hf_style_directory_and_custom_template(bpe, tmp_path):
    """HF dirs write specials as AddedToken dicts and may keep the template in chat_template.jinja."""
    bpe.hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<|bos|>", "special": True}, "eos_token": "<|end|>", "pad_token": None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}\n"
        "{% if m.role == 'system' %}{{ raise_exception('no system here') }}{% endif %}\n"
        "[{{ m.role }}] {{ m.content | tojson }}\n{% endfor %}")
    tok = Tokenizer.load(tmp_path)
    assert tok.eos_id == tok.token_to_id("<|end|>") and tok.pad_id is None
    assert tok.apply_chat_template([{"role": "user", "content": "é\"x"}]) == '<|bos|>[user] "é\\"x"\n'
    with pytest.raises(LlmkitError, match="no system here"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_from_hf_and_missing_template(bpe):
    hf = HFTokenizer.from_str(bpe.hf.to_str())
    tok = Tokenizer.from_hf(hf, bos_id=0, eos="<|eos|>", stop_ids=[2], chat_template="{{ messages[0].content }}")
    assert (tok.bos_token, tok.eos_id, tok.pad_id) == ("<|bos|>", 1, None)
    assert tok.stop_ids == [1, 2, tok.token_to_id("<|end|>")]
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"
    with pytest.raises(LlmkitError, match="not in the vocabulary"):
        Tokenizer.from_hf(hf, eos="<|missing|>")
    with pytest.raises(LlmkitError, match="outside the vocabulary"):
        Tokenizer.from_hf(hf, eos=10**6)
    with pytest.raises(LlmkitError, match="invalid chat template"):
        Tokenizer.from_hf(hf, chat_template="{% for %}")
    plain = Tokenizer.train_bpe(corpus(20), vocab_size=270, special_tokens=["<|eos|>"])
    assert plain.chat_template is None and plain.bos_id is None and plain.eos_id == 0
    with pytest.raises(LlmkitError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(LlmkitError, match="no BOS"):
        plain.encode("x", add_bos=True)


def test_transformers_loads_our_directory(bpe, tmp_path):
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = "The queen laughed ;  über 東京 <|end|>"
    assert hf_tok.encode(text, add_special_tokens=False) == bpe.encode(text)
    assert hf_tok.decode(bpe.encode(text)) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        bpe.apply_chat_template(messages)
