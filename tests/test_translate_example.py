"""examples/translate_en_fr.py's corpus: usable messages only, and a test split that shares no
source, nor a near-copy of one (case, closing punctuation), with training."""
import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "translate_en_fr.py"


def load_example():
    spec = importlib.util.spec_from_file_location("translate_en_fr", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corpus_split_is_honest(tmp_path, monkeypatch):
    example = load_example()
    catalogues = {
        "a.mo": {f"Open file {i}": f"Ouvrir le fichier {i}" for i in range(40)}
        | {"Save %s": "Enregistrer %s", "Same": "Same", "Two\nlines": "Deux\nlignes"},
        "b.mo": {f"open file {i}.": f"ouvrir le fichier {i}." for i in range(40)}  # near-copies of a.mo's
        | {f"Close window {i}:": f"Fermer la fenêtre {i} :" for i in range(40)},
    }
    monkeypatch.setattr(example, "catalogue_files", lambda: [Path(name) for name in catalogues])
    monkeypatch.setattr(example, "read_catalogue", lambda path: catalogues[path.name])
    counts = example.build_corpus(tmp_path, n_test=20, seed=0)
    assert counts == {"catalogues": 2, "train": 60, "test": 20}   # 80 distinct sources; placeholders etc. dropped
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    train = {example.near_key(p["source"]) for p in read("pairs.jsonl")}
    test = [p["prompt"] for p in read("test.jsonl")]
    assert len(train) == 60 and not train & {example.near_key(s) for s in test}
    assert all("Translate this English text to French" in p["prompt"] for p in read("test_chat.jsonl"))
