"""English -> French translation, offline, on the CPU: build a corpus from the message catalogues
installed on this machine, train a small encoder-decoder, and score it against two baselines.

    python examples/translate_en_fr.py                 # about 20 minutes on a laptop CPU
    python examples/translate_en_fr.py --steps 300     # a quick look

The corpus: gettext catalogues are human translations of program messages. Every French
catalogue found is read: compiled .mo files (the OS's /usr/share/locale/fr/LC_MESSAGES, and any
installed Python package's locale/fr directory, e.g. Django's) through the standard library's
gettext, and .po files through polib when it is installed. Nothing is downloaded, and the corpus
is built here, never shipped. Short single-line messages (1-12 words) make the pairs; a held-out
test set is scored by `llmkit eval --gen` (BLEU, chrF) with greedy and beam decoding, beside
copying the source and SmolLM2-135M-Instruct asked to translate.
"""
from __future__ import annotations

import argparse
import gettext
import json
import random
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PLACEHOLDER = re.compile(r"%|\{|\$|<|&|_")


def catalogue_files() -> list[Path]:
    roots = [Path("/usr/share/locale/fr/LC_MESSAGES"), Path(sysconfig.get_paths()["purelib"])]
    files = sorted(roots[0].glob("*.mo")) if roots[0].is_dir() else []
    for pattern in ("**/locale/fr/LC_MESSAGES/*.mo", "**/locale/fr/LC_MESSAGES/*.po"):
        files += sorted(roots[1].glob(pattern))
    return files


def read_catalogue(path: Path) -> dict[str, str]:
    try:
        if path.suffix == ".mo":
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
            return {k: v for k, v in catalog.items() if isinstance(k, str) and isinstance(v, str)}
        import polib  # only for .po files
        return {e.msgid: e.msgstr for e in polib.pofile(str(path)) if e.translated() and not e.msgid_plural}
    except Exception:  # noqa: BLE001 - a catalogue we cannot read is skipped, not fatal
        return {}


def usable(en: str, fr: str) -> bool:
    """One-line messages of 1-12 words, without format placeholders or markup, really translated."""
    if not en or not fr or "\n" in en + fr or en.strip() != en or fr.strip() != fr or en == fr:
        return False
    if PLACEHOLDER.search(en + fr) or not re.search("[a-zA-Z]", en):
        return False
    return 1 <= len(en.split()) <= 12 and len(fr) < 3 * len(en) + 10


def build_corpus(out: Path, n_test: int, seed: int) -> dict:
    pairs: dict[str, str] = {}
    files = catalogue_files()
    for path in files:
        for en, fr in read_catalogue(path).items():
            if usable(en, fr):
                pairs.setdefault(en, fr)
    items = sorted(pairs.items())
    random.Random(seed).shuffle(items)
    test, train = items[:n_test], items[n_test:]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"source": en, "target": fr}, ensure_ascii=False) + "\n" for en, fr in train)
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": en, "reference": fr}, ensure_ascii=False) + "\n" for en, fr in test)
    with open(out / "test_chat.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": f"Translate this English text to French. Answer with the French "
                                           f"translation only.\n\n{en}", "reference": fr}, ensure_ascii=False) + "\n"
                     for en, fr in test)
    return {"catalogues": len(files), "train": len(train), "test": len(test)}


def llmkit(*args: str) -> str:
    cmd = [sys.executable, "-m", "llmkit.cli", *args]
    print("$ llmkit " + " ".join(args), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr.strip() or f"llmkit {args[0]} failed")
    return done.stdout


def scores(model: str, gen_file: Path, *extra: str) -> dict:
    return json.loads(llmkit("eval", "--model", model, "--gen", str(gen_file), "--json", *extra))[0]


def copy_baseline(gen_file: Path) -> dict:
    import sacrebleu

    items = [json.loads(line) for line in gen_file.read_text(encoding="utf-8").splitlines()]
    sources, refs = [it["prompt"] for it in items], [[it["reference"] for it in items]]
    return {"bleu": sacrebleu.corpus_bleu(sources, refs).score, "chrf": sacrebleu.corpus_chrf(sources, refs).score}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/translate_en_fr")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (3000: ~20 min on 4 cores)")
    parser.add_argument("--test", type=int, default=200, help="held-out pairs to score")
    parser.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True,
                        help="also score SmolLM2-135M-Instruct prompted to translate")
    args = parser.parse_args()
    out = Path(args.out)
    corpus = build_corpus(out / "corpus", args.test, seed=0)
    if corpus["train"] < 1000:
        sys.exit(f"only {corpus['train']} usable pairs in {corpus['catalogues']} French catalogues; "
                 "install packages that ship them (e.g. pip install django) and retry")
    print(f"{corpus['catalogues']} catalogues -> {corpus['train']} training pairs, {corpus['test']} test pairs")
    llmkit("prepare", "--pairs", str(out / "corpus" / "pairs.jsonl"), "--out", str(out / "data"),
           "--vocab-size", "6000", "--val-fraction", "0.02")
    start = time.perf_counter()
    llmkit("train", "--objective", "seq2seq", "--preset", "seq2seq-tiny", "--data", str(out / "data"),
           "--out", str(out / "model"), "--max-steps", str(args.steps), "batch_size=48", "block_size=64",
           "lr=2e-3", "warmup_steps=300", "lr_schedule=inverse_sqrt", "label_smoothing=0.1", "weight_decay=0.01",
           "model.n_embd=192", "model.n_head=6", "model.intermediate_size=768", "model.n_layer=3",
           "eval_interval=500", "log_interval=100", "ckpt_interval=1000", "progress=false")
    minutes = (time.perf_counter() - start) / 60
    test = out / "corpus" / "test.jsonl"
    rows = [("copy the source", copy_baseline(test)),
            ("llmkit seq2seq, greedy", scores(str(out / "model"), test)),
            ("llmkit seq2seq, 4 beams", scores(str(out / "model"), test, "--num-beams", "4"))]
    if args.smollm2:
        rows.append(("SmolLM2-135M-Instruct, prompted", scores("smollm2-135m-instruct", out / "corpus" / "test_chat.jsonl",
                                                               "--chat", "--max-new-tokens", "48")))
    print(f"\ntrained {args.steps} steps in {minutes:.1f} min; {corpus['test']} held-out pairs\n")
    print(f"| {'system':34} | {'BLEU':>6} | {'chrF':>6} |\n|{'-' * 36}|{'-' * 8}|{'-' * 8}|")
    for name, r in rows:
        print(f"| {name:34} | {r['bleu']:6.1f} | {r['chrf']:6.1f} |")


if __name__ == "__main__":
    main()
