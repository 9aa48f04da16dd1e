"""Marian directories without tokenizer.json (source.spm, target.spm, vocab.json): ids and texts
equal to transformers' MarianTokenizer on SentencePiece models trained here, and a model that
translates through them as transformers' does."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from llmkit.errors import LlmkitError
from llmkit.infer.beam import BeamParams, generate_beams
from llmkit.infer.sampling import SamplingParams
from llmkit.io.hf import load_hf
from llmkit.io.spm import marian_tokenizer

EN = ["The file could not be saved.", "Open the selected folder", "Delete all temporary files?",
      "Show hidden files and folders", "The printer is out of paper", "Cannot connect to the server",
      "Save changes before closing?", "Invalid password, try again", "Select a language from the list"]
FR = ["Le fichier n'a pas pu être enregistré.", "Ouvrir le dossier sélectionné",
      "Supprimer tous les fichiers temporaires ?", "Afficher les fichiers et dossiers cachés",
      "L'imprimante n'a plus de papier", "Impossible de se connecter au serveur",
      "Enregistrer les modifications avant de fermer ?", "Mot de passe non valide, réessayez",
      "Choisissez une langue dans la liste"]
TEXTS = ["Open the file", "  Save   the\tfolder  ", "Ünïcode façade — ﬁle", "zebra ☃ quokka", "x",
         ">>fra<< Delete the files", "Le dossier sélectionné"]


def train_spm(texts, prefix):
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 4), model_prefix=str(prefix), vocab_size=90, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1,
        minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("marian")
    (root / "source.spm").write_bytes(train_spm(EN, root / "src").read_bytes())
    (root / "target.spm").write_bytes(train_spm(FR, root / "tgt").read_bytes())
    pieces = {"</s>": 0, "<unk>": 1, ">>fra<<": 2}
    for name in ("src.vocab", "tgt.vocab"):  # source pieces, then the target's new ones (Marian's joint vocab)
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            pieces.setdefault(line.split("\t")[0], len(pieces))
    pieces.pop("<s>", None)
    pieces = {p: i for i, p in enumerate(pieces)}
    pieces["<pad>"] = len(pieces)
    (root / "vocab.json").write_text(json.dumps(pieces, ensure_ascii=False), encoding="utf-8")
    config = transformers.MarianConfig(
        vocab_size=len(pieces), pad_token_id=len(pieces) - 1, eos_token_id=0, decoder_start_token_id=len(pieces) - 1,
        forced_eos_token_id=None, bos_token_id=None, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = transformers.MarianMTModel(config).eval()
    torch.manual_seed(5)
    with torch.no_grad():  # larger weights: sources decode to different, multi-word texts
        for name, p in model.named_parameters():
            if p.dim() > 1 and "embed_positions" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def reference(marian_dir):
    return transformers.MarianTokenizer(str(marian_dir / "source.spm"), str(marian_dir / "target.spm"),
                                        str(marian_dir / "vocab.json"))


def test_ids_and_texts_match_marian_tokenizer(marian_dir, reference):
    ours = marian_tokenizer(marian_dir)
    assert not (marian_dir / "tokenizer.json").exists()
    for text in TEXTS:
        assert ours.encode(text, add_eos=True) == reference(text)["input_ids"], text
    for text in FR + TEXTS:
        ids = reference(text_target=text)["input_ids"]
        assert ours.decode(ids, skip_special=True) == reference.decode(ids, skip_special_tokens=True), text


def test_marian_dir_translates_as_transformers_does(marian_dir, reference):
    model, tokenizer = load_hf(marian_dir)
    hf = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
    texts = []
    for text in EN[:4]:
        params = BeamParams(num_beams=3, max_new_tokens=8, no_repeat_ngram_size=1)
        ours = generate_beams(model, tokenizer, [text], SamplingParams(max_new_tokens=8), params)[0][0]
        with torch.no_grad():
            out = hf.generate(**reference([text], return_tensors="pt"), num_beams=3, max_new_tokens=8,
                              do_sample=False, early_stopping=False, no_repeat_ngram_size=1)
        assert ours == reference.decode(out[0], skip_special_tokens=True), text
        texts.append(ours)
    assert len(set(texts)) > 1 and any(" " in t for t in texts)


def test_unsupported_marian_tokenizers_are_one_line(marian_dir, tmp_path):
    (tmp_path / "vocab.json").write_text('{"<unk>": 0, "a": 5}')
    (tmp_path / "source.spm").write_bytes((marian_dir / "source.spm").read_bytes())
    with pytest.raises(LlmkitError, match="ids 0..n-1"):
        marian_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('{"<unk>": 0, "a": 1}')
    (tmp_path / "source.spm").write_bytes(b"not a model")
    with pytest.raises(LlmkitError, match="not a SentencePiece model"):
        marian_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"separate_vocabs": true}')
    with pytest.raises(LlmkitError, match="separate_vocabs"):
        marian_tokenizer(tmp_path)
