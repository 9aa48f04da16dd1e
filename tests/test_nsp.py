"""Next-sentence prediction: BertForPreTraining parity (import and export) and `--objective mlm+nsp` training."""
import pytest
import torch

from encoderkit import one_thread  # noqa: F401
from llmkit.encoders import load_encoder
from llmkit.interop.bert import convert_state_dict
from llmkit.io.bert_export import hf_state_dict, save_hf_bert
from llmkit.model.heads import PretrainingEncoder
from llmkit.interop.bert import config_from_hf

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
