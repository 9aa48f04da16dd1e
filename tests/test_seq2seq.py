"""The encoder-decoder model against transformers' Marian, BART and T5 on small random models:
equal logits, equal greedy and beam outputs, import and export both ways."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from llmkit.errors import LlmkitError  # noqa: E402
from llmkit.infer.beam import BeamParams, seq2seq_decode  # noqa: E402
from llmkit.io.hf_seq2seq import load_hf_seq2seq, save_hf_seq2seq  # noqa: E402
from llmkit.model.seq2seq import Seq2Seq, seq2seq_preset  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

VOCAB = 300
IDS = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=1, decoder_start_token_id=2, forced_eos_token_id=None,
           bos_token_id=None)
BART_LIKE = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0,
                 attention_dropout=0.0, activation_dropout=0.0)
HF_CONFIGS = {
    "marian": lambda: transformers.MarianConfig(**IDS, **BART_LIKE, scale_embedding=True),
    "marian-relu": lambda: transformers.MarianConfig(**IDS, **BART_LIKE, activation_function="relu"),
    "bart": lambda: transformers.BartConfig(**IDS, **{**BART_LIKE, "decoder_layers": 3}),
    "t5": lambda: transformers.T5Config(**IDS, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                        num_heads=4, dropout_rate=0.0, relative_attention_num_buckets=8,
                                        relative_attention_max_distance=20),
    # T5 v1.1: gated GELU, and (transformers 5) no output scaling
    "t5-gated": lambda: transformers.T5Config(**IDS, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                              dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"] * 8, vocab_size=VOCAB)
    assert tok.vocab_size <= VOCAB
    return tok


def random_model(name):
    torch.manual_seed(0)
    config = HF_CONFIGS[name]()
    model = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    # peaked distributions (end tokens get chosen), perturbed norms and biases; T5 v1.1 has no output
    # scaling, so its weights grow less to keep its logits' float32 rounding under the 1e-4 tolerance
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "embed_positions" in pname and name.startswith("marian"):
                continue  # Marian's fixed sinusoids are not saved
            p.add_(0.05 * torch.randn_like(p)) if "norm" in pname or pname.endswith("bias") else p.mul_(1.0 if "gated" in name else 4.0)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_(0, 0.5)
    return model


def hf_generate(hf, src, params: BeamParams):
    with torch.no_grad():
        out = hf.generate(torch.tensor([src]), attention_mask=torch.ones(1, len(src), dtype=torch.long),
                          do_sample=False, num_beams=params.num_beams, max_new_tokens=params.max_new_tokens,
                          length_penalty=params.length_penalty, early_stopping=params.early_stopping,
                          num_return_sequences=params.num_return_sequences, forced_eos_token_id=None,
                          forced_bos_token_id=None, no_repeat_ngram_size=params.no_repeat_ngram_size or None)
    rows = [row[1:].tolist() for row in out]  # drop the decoder start token
    return [row[:row.index(1) + 1] if 1 in row else row for row in rows]


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_import_generate_and_export_match_transformers(name, tokenizer, tmp_path):
    ref = random_model(name)
    ref.save_pretrained(tmp_path / "hf")
    tokenizer.save(tmp_path / "hf")
    model, _ = load_hf_seq2seq(tmp_path / "hf")
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, VOCAB, (2, 11), generator=g)
    src_mask = torch.ones_like(src, dtype=torch.bool)
    src_mask[1, 8:] = False                                   # a padded source row
    tgt = torch.randint(3, VOCAB, (2, 7), generator=g)
    with torch.no_grad():
        expected = ref(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits
        ours = model(src, tgt, src_mask=src_mask)[0]
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours - expected).abs().max()
    # incremental decoding with the cache gives the teacher-forced logits
    with torch.no_grad():
        cache = model.new_cache(model.encode(src, src_mask), src_mask, 8)
        steps = torch.cat([model.decode(tgt[:, i:i + 1], cache) for i in range(7)], dim=1)
    assert torch.allclose(steps, expected, atol=1e-4, rtol=0)
    for seed, params in enumerate([BeamParams(num_beams=1, max_new_tokens=12),
                                   BeamParams(num_beams=4, max_new_tokens=12, num_return_sequences=2),
                                   BeamParams(num_beams=3, max_new_tokens=10, length_penalty=0.5, early_stopping=True,
                                              no_repeat_ngram_size=2)]):
        source = torch.randint(3, VOCAB, (9,), generator=torch.Generator().manual_seed(seed)).tolist() + [1]
        assert [h.tokens for h in seq2seq_decode(model, source, params)] == hf_generate(ref, source, params), params
    save_hf_seq2seq(model, tokenizer, tmp_path / "back")
    again = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(ref)
    with torch.no_grad():
        back = again(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits
    assert torch.allclose(back, expected, atol=1e-4, rtol=0)


def test_presets_and_paper_model_export_as_marian(tokenizer, tmp_path):
    base = seq2seq_preset("transformer-base")
    assert (base.n_layer, base.n_dec_layer, base.n_embd, base.n_head, base.intermediate_size) == (6, 6, 512, 8, 2048)
    torch.manual_seed(0)
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=VOCAB, dropout=0.0, sinusoid_halves=True)).eval()
    save_hf_seq2seq(model, tokenizer, tmp_path / "m")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "m").eval()
    src, tgt = torch.randint(3, VOCAB, (1, 9)), torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.allclose(model(src, tgt)[0], hf(input_ids=src, decoder_input_ids=tgt).logits, atol=1e-4, rtol=0)


def test_unexportable_config_is_refused_before_writing(tokenizer, tmp_path):
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=VOCAB))  # interleaved sinusoids: no HF family
    with pytest.raises(LlmkitError, match="no Hugging Face architecture"):
        save_hf_seq2seq(model, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_long_source_is_refused_in_one_line():
    model = Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=VOCAB, block_size=16))
    with pytest.raises(LlmkitError, match="source of 20 tokens exceeds block_size=16"):
        model.encode(torch.ones(1, 20, dtype=torch.long))
