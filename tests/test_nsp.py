"""Next-sentence prediction: BertForPreTraining parity (import and export) and `--objective mlm+nsp` training."""
import pytest
import torch

from llmkit.io.bert import config_from_hf, convert_state_dict
from llmkit.io.bert_export import hf_state_dict, save_hf_bert
from llmkit.io.encoders import load_encoder
from llmkit.model.heads import PretrainingEncoder

transformers = pytest.importorskip("transformers")


def _hf_model():
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForPreTraining(config).eval()
    with torch.no_grad():  # BERT's init leaves biases and LayerNorms at 0/1: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 12), generator=g)
    types = torch.cat([torch.zeros(3, 5), torch.ones(3, 7)], 1).long()
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    return ids, types, mask


def _compare(ours, theirs):
    ids, types, mask = _inputs()
    with torch.no_grad():
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=mask)
        (mlm, nsp), _ = ours(ids, mask.bool(), types)
    keep = mask.bool()
    torch.testing.assert_close(mlm[keep], ref.prediction_logits[keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(nsp, ref.seq_relationship_logits, atol=1e-4, rtol=1e-4)


def test_import_matches_bert_for_pretraining():
    hf = _hf_model()
    config = config_from_hf(hf.config.to_dict(), pooling="cls")
    ours = PretrainingEncoder(config).eval()
    ours.load_state_dict(convert_state_dict(hf.state_dict(), config.n_layer, nsp=True), strict=True)
    _compare(ours, hf)


def test_export_round_trips_through_transformers(tmp_path):
    hf = _hf_model()
    config = config_from_hf(hf.config.to_dict(), pooling="cls")
    ours = PretrainingEncoder(config).eval()
    ours.load_state_dict(convert_state_dict(hf.state_dict(), config.n_layer, nsp=True))
    save_hf_bert(ours, None, tmp_path / "hf")
    again = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    _compare(ours, again)
    assert set(hf_state_dict(ours)) <= set(hf.state_dict())


# ---- training: --objective mlm+nsp --------------------------------------------------------------

def test_sampler_pairs_true_and_random_segments():
    import numpy as np

    from llmkit.train.nsp import NextSentenceSampler

    tokens = np.arange(10, 2010, dtype=np.uint16)  # every id once: a continuation is an exact +1 step
    sampler = NextSentenceSampler(tokens, 16, 64, cls_id=1, sep_id=2, mask_id=3, vocab_size=3000,
                                  special_ids=[1, 2], seed=0)
    state = sampler.state_dict()
    x, y = sampler.next_batch()
    assert x.shape == (64, 16) and y.shape == (64, 33)
    sampler.load_state_dict(state)
    assert torch.equal(sampler.next_batch()[1], y)  # resume replays the same batch
    labels, types, nxt = y[:, :16], y[:, 16:32], y[:, 32]
    ids = torch.where(labels != -100, labels, x)  # undo the masking
    assert 0.3 < nxt.float().mean() < 0.7
    for row, t, n in zip(ids, types, nxt):
        assert row[0] == 1 and row[-1] == 2 and (row == 2).sum() == 2
        a, b = row[1: int((t == 0).sum()) - 1], row[int((t == 0).sum()): -1]
        follows = bool(b[0] == a[-1] + 1)
        assert follows == (n == 0) or (n == 1 and follows)  # a random B may follow A by chance


def test_mlm_nsp_pretraining_trains_and_exports(tmp_path, monkeypatch, capsys):
    from conftest import run_cli, shared_file
    from llmkit.data.corpus import prepare
    from llmkit.tokenizer import Tokenizer

    corpus = tmp_path / "ts.txt"
    corpus.write_text(shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    prepare([corpus], tmp_path / "data", Tokenizer.train_bpe([corpus.read_text(encoding="utf-8")], 512))
    code, out, err = run_cli(monkeypatch, capsys, "train", "--objective", "mlm+nsp", "--data", tmp_path / "data",
                             "--out", tmp_path / "bert", "--preset", "bert-tiny", "--max-steps", 30, "batch_size=16",
                             "block_size=32", "model.n_embd=64", "model.intermediate_size=128", "lr=2e-3",
                             "warmup_steps=3", "lr_decay_steps=30", "eval_interval=0", "log_interval=5",
                             "ckpt_interval=0", "progress=false")
    assert code == 0, err
    import json
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "bert" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[0] > losses[-1] + 0.5, losses  # MLM near log(513) + NSP near log(2) at the start
    model, _ = load_encoder(tmp_path / "bert")
    assert isinstance(model, PretrainingEncoder)
    code, out, _ = run_cli(monkeypatch, capsys, "convert", tmp_path / "bert", tmp_path / "hf", "--to", "hf")
    assert code == 0 and (tmp_path / "hf" / "tokenizer.json").exists()
    _compare(model, transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval())
