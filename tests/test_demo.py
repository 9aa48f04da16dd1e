"""The demo's pipeline end to end on a few steps: corpus from the machine, BPE, training, samples."""
import io
import json
import math

from llmkit import demo


def test_demo_pipeline_runs_on_the_bundled_corpus(tmp_path):
    out = io.StringIO()
    result = demo.run(tmp_path, max_steps=40, chat=False, out=out)
    text = out.getvalue()
    assert "validation loss" in text and "perplexity" in text
    # 40 steps already beat uniform guessing over the vocabulary by a wide margin
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(demo.DEMO_VOCAB) - 1
    assert len(result["samples"]) == len(demo.DEMO_PROMPTS)
    docs = [json.loads(line)["text"] for line in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(docs) > 50 and all(docs)
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert result["answer"] is None
