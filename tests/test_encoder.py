"""The encoder model: shapes per task, padding invariance, tied MLM output, heads, save/load."""
import json

import pytest
import torch

from conftest import tiny_encoder_dir
from llmkit.io.encoders import LABELS_FILE, load_encoder, save_encoder
from llmkit.errors import LlmkitError
from llmkit.model.encoder import Encoder, EncoderConfig, encoder_preset, with_head

CFG = dict(vocab_size=50, max_position=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def batch(B=3, T=10, pad=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 3:] = False
    return ids.masked_fill(~mask, pad), mask


@pytest.mark.parametrize("task,shape", [(None, (3, 32)), ("mlm", (3, 10, 50)), ("classify", (3, 4)),
                                        ("tag", (3, 10, 4))])
def test_output_shapes_per_task(task, shape):
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**CFG), task, labels=list("abcd")).eval()
    ids, mask = batch()
    out, loss = model(ids, attention_mask=mask)
    assert out.shape == shape and loss is None


def test_padding_does_not_change_real_tokens():
    """A sequence alone and inside a padded batch gives the same hidden states and embedding."""
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**CFG)).eval()
    ids, mask = batch()
    with torch.no_grad():
        hidden = model.encode(ids, mask)
        alone = model.encode(ids[2:3, :3])
        emb = model(ids, attention_mask=mask)[0]
        emb_alone = model(ids[2:3, :3])[0]
    torch.testing.assert_close(hidden[2, :3], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[2], emb_alone[0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)  # normalize=True


def test_cls_pooling_and_no_normalisation():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**CFG, pooling="cls", normalize=False)).eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask)[0], model.encode(ids, mask)[:, 0])


def test_mlm_output_is_tied_to_token_embeddings():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**CFG), "mlm")
    assert not any(name.startswith("mlm") and p.shape == (50, 32) for name, p in model.named_parameters())
    ids, mask = batch()
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 4] = 7, 9
    logits, loss = model(ids, attention_mask=mask, labels=labels)
    assert logits.shape == (2, 50)  # only the labelled positions are projected
    loss.backward()
    # the gradient reaches the embedding rows through the output projection too (all 50 rows, not just inputs)
    assert (model.embed.weight.grad.abs().sum(-1) > 0).all()
    full, _ = model(ids, attention_mask=mask)
    torch.testing.assert_close(full[0, 2], logits[0])


def test_mlm_loss_with_nothing_masked_is_zero_not_nan():
    model = Encoder(EncoderConfig(**CFG), "mlm")
    ids, mask = batch()
    _, loss = model(ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0


def test_classify_and_tag_losses():
    torch.manual_seed(0)
    ids, mask = batch()
    clf = Encoder(EncoderConfig(**CFG), "classify", labels=["a", "b", "c"])
    _, loss = clf(ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    assert 0.5 < loss.item() < 2.0  # near log(3) at init
    tag = Encoder(EncoderConfig(**CFG), "tag", labels=["O", "B-x", "I-x"])
    tags = torch.full_like(ids, -100)
    tags[:, 1] = 1
    _, loss = tag(ids, attention_mask=mask, labels=tags)
    assert torch.isfinite(loss)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(**{**CFG, "dropout": 0.3}))
    ids, mask = batch()
    model.eval()
    torch.testing.assert_close(model(ids, attention_mask=mask)[0], model(ids, attention_mask=mask)[0])
    model.train()
    assert not torch.allclose(model(ids, attention_mask=mask)[0], model(ids, attention_mask=mask)[0])


def test_bad_config_and_inputs():
    with pytest.raises(LlmkitError, match="pooling"):
        EncoderConfig(**CFG, pooling="max")
    with pytest.raises(LlmkitError, match="divisible"):
        EncoderConfig(**{**CFG, "n_head": 3})
    with pytest.raises(LlmkitError, match="preset"):
        encoder_preset("bert-huge")
    with pytest.raises(LlmkitError, match="at least 2 labels"):
        Encoder(EncoderConfig(**CFG), "classify", labels=["only"])
    with pytest.raises(LlmkitError, match="longer than"):
        Encoder(EncoderConfig(**CFG)).encode(torch.zeros(1, 17, dtype=torch.long))


def test_with_head_copies_the_backbone_only():
    torch.manual_seed(0)
    base = Encoder(EncoderConfig(**CFG), "mlm")
    clf = with_head(base, "classify", ["x", "y"])
    assert not hasattr(clf, "mlm") and clf.head.out_features == 2
    torch.testing.assert_close(clf.blocks[1].mlp.fc.weight, base.blocks[1].mlp.fc.weight)
    assert clf.embed.weight.data_ptr() != base.embed.weight.data_ptr()  # a copy, not shared


def test_save_load_roundtrip_with_labels(tmp_path):
    base = tiny_encoder_dir(tmp_path / "base", ["book a table", "play a song", "set an alarm"])
    model, tok = load_encoder(base)
    clf = with_head(model, "classify", ["alarm", "music", "table"]).eval()
    save_encoder(tmp_path / "clf", clf, tok)
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["arch"] == "encoder" and meta["task"] == "classify" and meta["labels"] == ["alarm", "music", "table"]
    loaded, _ = load_encoder(tmp_path / "clf")
    ids, mask = batch(T=8)
    ids = ids.clamp(max=tok.vocab_size - 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask)[0], clf(ids, attention_mask=mask)[0])
    assert loaded.labels == clf.labels

    # a label file that does not match the checkpoint is refused, naming the file
    (tmp_path / "clf" / LABELS_FILE).write_text(json.dumps({"task": "classify", "labels": ["alarm", "music"]}))
    with pytest.raises(LlmkitError, match="labels.json.*does not match"):
        load_encoder(tmp_path / "clf")
    (tmp_path / "clf" / LABELS_FILE).unlink()
    with pytest.raises(LlmkitError, match="missing label file"):
        load_encoder(tmp_path / "clf")


def test_load_errors(tmp_path):
    with pytest.raises(LlmkitError, match="no such model"):
        load_encoder(tmp_path / "nope")
    (tmp_path / "dec").mkdir()
    (tmp_path / "dec" / "config.json").write_text(json.dumps({"arch": "decoder", "model": {}}))
    with pytest.raises(LlmkitError, match="not an encoder"):
        load_encoder(tmp_path / "dec")
