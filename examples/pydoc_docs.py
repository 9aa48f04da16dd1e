"""Writes Python's bundled documentation (pydoc_data.topics) as JSONL documents {"id": topic, "text"} for
`llmkit index`; examples/data/pydoc_questions.jsonl asks questions whose answers live in these topics.

    python examples/pydoc_docs.py runs/pydoc_docs.jsonl
    llmkit index runs/pydoc_docs.jsonl --model all-minilm-l6-v2 --out runs/pydoc_index
    llmkit ask --index runs/pydoc_index --eval examples/data/pydoc_questions.jsonl
"""
import json
import sys
from pathlib import Path

from pydoc_data.topics import topics

out = Path(sys.argv[1] if len(sys.argv) > 1 else "pydoc_docs.jsonl")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("".join(json.dumps({"id": k, "text": topics[k]}) + "\n" for k in sorted(topics)), encoding="utf-8")
print(f"wrote {len(topics)} topics to {out}")
