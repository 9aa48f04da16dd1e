"""Every command against bad input, as a hostile new user would try it: each case must exit
non-zero with exactly one `error: ...` line on stderr (no traceback), say what is wrong, and leave
no file behind. Runs in-process (a subprocess per case would cost seconds each)."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import (edited_copy, hf_dir_with_index, nan_model_dir, fox_model, fox_tokenizer, tree,
                         workspace, write_gguf)
from llmkit.io.checkpoint import save_checkpoint
from llmkit.cli import main
from conftest import make_data_dir

NO_DIR = "/proc/llmkit-cannot-write"  # /proc refuses new entries, even to root

# (command line with {placeholders}, text the one-line message must contain)
CASES = {
    "prepare": [
        ("prepare {text} --out {text}/sub", "is not a directory"),
        ("prepare {text} --out {text}", "is a file, not a directory"),
        (f"prepare {{text}} --out {NO_DIR}/data", "not writable"),
        ("prepare {text} --out data --val-fraction 1.5", "--val-fraction must be a number in [0, 1)"),
        ("prepare {text} --out data --val-fraction nan", "--val-fraction"),
        ("prepare {text} --out data --vocab-size 0", "--vocab-size must be an integer >= 256"),
        ("prepare nosuch.txt --out data", "nosuch.txt"),
        ("prepare {text} --out data --tokenizer nosuch.json", "nosuch.json"),
        ("prepare {badjsonl} --out data", "malformed JSON"),
    ],
    "train": [
        ("train --data {data} --out {text}/run", "is not a directory"),
        ("train --data {data} --out {text}", "is a file, not a directory"),
        ("train --data {data} --out run model.n_head=0", "n_head must be an integer >= 1"),
        ("train --data {data} --out run model.n_kv_head=-2", "n_kv_head must be an integer >= 1"),
        ("train --data {data} --out run model.n_layer=-1", "n_layer must be an integer >= 1"),
        ("train --data {data} --out run model.dropout=1.5", "dropout must be a number in [0, 1)"),
        ("train --data {data} --out run beta1=1.0", "beta1 must be a number in [0, 1)"),
        ("train --data {data} --out run beta2=-0.1", "beta2 must be a number in [0, 1)"),
        ("train --data {data} --out run threads=-2", "threads must be an integer >= 1"),
        ("train --data {data} --out run model.n_layer=four", "'four' is not an integer"),
        ("train {yaml_model_list} --data {data} --out run", "'model' must be a mapping"),
        ("train --data {data} --out run device=foo", "device 'foo'"),
        ("train --data {data} --out run device=cuda", "no CUDA GPU"),
        ("train --data {data} --out run --preset nosuch", "choose from char-tiny"),
        ("train --data nosuch --out run", "nosuch"),
        ("train --data {data} --out run lr=-1", "lr=-1.0"),
        ("train --data {data} --out run lr=0 min_lr=0", "lr must be a number > 0"),
        ("train --data {data} --out run batch_size=0", "batch_size"),
        ("train --data {data} --out run nosuch=1", "unknown training config key 'nosuch'"),
        ("train --data {data} --out run --max-steps -1", "max_steps"),
    ],
    "eval": [
        ("eval --model {model} --text {text} --batch-size 0", "--batch-size must be an integer >= 1"),
        ("eval --model {model} --text {text} --batch-size -3", "--batch-size must be an integer >= 1"),
        ("eval --model {model} --text {text} --max-tokens -5", "--max-tokens must be an integer >= 1"),
        ("eval --model {model} --text {text} --max-tokens 0", "--max-tokens must be an integer >= 1"),
        ("eval --model {model} --text {text} --stride 0", "--stride must be an integer >= 1"),
        ("eval --model {model} --data {data} --stride -1", "--stride must be an integer >= 1"),
        ("eval --model {model} --text {text} --output {root}", "is a directory"),
        ("eval --model {model} --text {text} --output {text}/out.json", "is not a directory"),
        (f"eval --model {{model}} --text {{text}} --output {NO_DIR}/r.json", "not writable"),
        ("eval --model {model} --mc {text} --output {root}", "is a directory"),
        ("eval --model {model} --text {text} --device foo", "--device 'foo' is not a device"),
        ("eval --model {model} --text {text} --device cuda", "no CUDA GPU"),
        ("eval --model nosuch --text {text}", "no such model 'nosuch'"),
        ("eval --model {model_str_layers} --text {text}", "n_layer must be an integer, got '4'"),
        ("eval --model {model} --text {text} --data {data}", "exactly one of --text FILE or --data DIR"),
        ("eval --model {model} --text nosuch.txt", "cannot read text file nosuch.txt"),
    ],
    "generate": [
        ("generate hi --model {model} --temperature -1", "temperature must be >= 0"),
        ("generate hi --model {model} --top-p 0", "top_p must be in (0, 1]"),
        ("generate hi --model {model} --top-p 1.5", "top_p must be in (0, 1]"),
        ("generate hi --model {model} --top-k 0", "top_k must be >= 1"),
        ("generate hi --model {model} --max-new-tokens -1", "max_new_tokens must be an integer >= 0"),
        ("generate hi --model {model} --repetition-penalty 0", "repetition_penalty must be > 0"),
        ("generate hi --model {model} --num-samples 0", "--num-samples must be >= 1"),
        ("generate hi --model {model} --device foo", "--device 'foo' is not a device"),
        ("generate hi --model {model} --device cuda:3", "no CUDA GPU"),
        ("generate hi --model {model} --dtype float8", "unknown dtype 'float8'"),
        ("generate hi --model {model_heads0}", "n_head must be an integer >= 1"),
        ("generate hi --model {model_kv0}", "n_kv_head must be an integer >= 1"),
        ("generate hi --model {model_dropout}", "dropout must be a number in [0, 1)"),
        ("generate hi --model {model_nondict}", "model config must be a mapping"),
        ("generate hi --model {model_bool_layers}", "n_layer must be an integer, got True"),
        ("generate hi --model {gguf_align0}", "general.alignment must be a positive integer"),
        ("generate hi --model {gguf_heads0}", "llama.attention.head_count must be a positive integer"),
        ("generate hi --model {gguf_str_number}", "llama.block_count must be a positive integer, got 'two'"),
        ("generate hi --model {hf_index_list}", "\"weight_map\" must be a non-empty mapping"),
        ("generate hi --model {hf_index_abs}", "is not a file name inside"),
        ("generate hi --model {hf_index_dotdot}", "is not a file name inside"),
        ("generate hi --model {nan_model} --seed 0", "NaN or infinite logits"),
        ("generate hi --model {nan_model} --temperature 0", "NaN or infinite logits"),
        ("generate --model {model}", "give either a PROMPT or --prompt-file"),
        ("generate hi --model {model} --prompt-file {text}", "give either a PROMPT or --prompt-file"),
        ("generate --model {model} --prompt-file {empty}", "has no prompts"),
    ],
    "chat": [
        ("chat --model {model} --top-p 2", "top_p must be in (0, 1]"),
        ("chat --model {model} --device cuda", "no CUDA GPU"),
        ("chat --model {model} --max-new-tokens -3", "max_new_tokens must be an integer >= 0"),
    ],
    "convert": [
        ("convert {model} {text}", "is a file, not a directory"),
        ("convert {model} {text}/out", "is not a directory"),
        (f"convert {{model}} {NO_DIR}/out", "not writable"),
        ("convert {model} out --to onnx", "unknown target format 'onnx'"),
        ("convert {model} {model}", "the destination is the source"),
        ("convert {gguf_heads0} out", "head_count must be a positive integer"),
    ],
    "serve": [
        ("serve --model {model} --port 99999", "--port must be an integer in [1, 65535]"),
        ("serve --model {model} --port 0", "--port must be an integer in [1, 65535]"),
        ("serve --model {model} --context -5", "--context must be an integer >= 1"),
        ("serve --model {model} --timeout -1", "--timeout must be a number > 0"),
        ("serve --model {model} --timeout nan", "--timeout must be a number > 0"),
        ("serve --model {model} --max-body -1", "--max-body must be an integer >= 1"),
        ("serve --model {model} --max-batch 0", "--max-batch must be an integer >= 1"),
        ("serve --model {model} --port abc", "Invalid value for '--port'"),
        ("serve --model {model} --name ' '", "--name"),
        ("serve --model nosuch", "no such model 'nosuch'"),
    ],
    "distill": [
        ("distill --teacher {model} --student nosuch --data {data} --out st", "choose from char-tiny"),
        ("distill --teacher {model} --student char-tiny --data {data} --out st --alpha 1.5",
         "--alpha must be a number in [0, 1]"),
        ("distill --teacher {model} --student char-tiny --data {data} --out st --temperature 0",
         "--temperature must be a number > 0"),
        ("distill --teacher {model} --student char-tiny --data {data} --out {text}", "is a file"),
    ],
    "plot": [
        ("plot {metrics} --out {root}", "is a directory"),
        ("plot {metrics} --out {text}/p.png", "is not a directory"),
        ("plot nosuch", "nosuch"),
    ],
    "attention": [
        ("attention hi --model {model} --out {root}", "is a directory"),
        ("attention hi --model {model} --out {text}/a.png", "is not a directory"),
        ("attention hi --model {model} --layers x", "--layers must be comma-separated integers"),
        ("attention hi --model {model} --layers 99", "layer 99 does not exist"),
    ],
    "embed": [
        ("embed {text} --out {root}/e.txt", "must end in .jsonl or .npy"),
        ("embed {text} --out {text}/e.jsonl", "is not a directory"),
        ("embed {text} --batch-size 0", "--batch-size must be an integer >= 1"),
        ("embed {text} --device foo", "--device 'foo' is not a device"),
        ("embed nosuch.txt --model {model}", "nosuch.txt"),
    ],
    "finetune": [
        ("finetune {labels} --task nosuch --model m --out ft", "unknown --task 'nosuch'"),
        ("finetune {labels} --task classify --model m --out {text}", "is a file"),
        ("finetune {labels} --task classify --model m --out ft --epochs 0", "--epochs must be an integer >= 1"),
        ("finetune {labels} --task classify --model m --out ft --lr -1", "--lr must be a number > 0"),
        ("finetune {labels} --task sft --model m --out ft --lora --lora-dropout 1.5", "--lora-dropout"),
        ("finetune --task classify --model m --out ft", "give the training data once"),
    ],
    "predict": [
        ("predict {labels} --model {model} --batch-size 0", "--batch-size must be an integer >= 1"),
        ("predict {labels} --model {model} --out {root}", "is a directory"),
        ("predict {labels} --model {model} --device cuda", "no CUDA GPU"),
    ],
    "dialog": [
        ("dialog {text} --nlu m --reply poem", "--reply must be template or chat"),
        ("dialog {text} --nlu m --actions {root}", "is a directory"),
    ],
    "index": [
        ("index {text} --out {text}", "is a file, not a directory"),
        ("index {text} --out idx --chunk-words 0", "--chunk-words must be an integer >= 1"),
        ("index {text} --out idx --overlap 80", "--overlap must be an integer in [0, 79]"),
        ("index {text} --out idx --batch-size 0", "--batch-size must be an integer >= 1"),
    ],
    "ask": [
        ("ask --index nosuch", "give a QUESTION or --eval"),
        ("ask hi --index nosuch -k 0", "-k >= 1"),
    ],
    "prune": [
        ("prune {model} --out {text}", "is a file, not a directory"),
        ("prune {model} --out pruned --sparsity 1.5", "--sparsity must be a number in [0, 1)"),
    ],
    "quantize": [
        ("quantize {model} --to q8_0 --out {text} --text {text}", "is a file, not a directory"),
    ],
    "demo": [
        ("demo --out {text}", "is a file, not a directory"),
        ("demo --max-steps 0", "--max-steps must be an integer >= 1"),
    ],
}
TABLE = [(cmd, line, expected) for cmd, cases in CASES.items() for line, expected in cases]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Placeholders -> paths, all under one root the tests snapshot."""
    root, tok, model = workspace(tmp_path_factory, "bad")
    paths = {"root": root, "model": save_checkpoint(root / "model", model, tok), "data": make_data_dir(root)}
    edits = {"model_heads0": lambda m: {**m, "model": {**m["model"], "n_head": 0}},
             "model_kv0": lambda m: {**m, "model": {**m["model"], "n_kv_head": 0}},
             "model_dropout": lambda m: {**m, "model": {**m["model"], "dropout": 2.0}},
             "model_str_layers": lambda m: {**m, "model": {**m["model"], "n_layer": "4"}},
             "model_bool_layers": lambda m: {**m, "model": {**m["model"], "n_layer": True}},
             "model_nondict": lambda m: {**m, "model": [1, 2]}}
    for name, edit in edits.items():
        paths[name] = edited_copy(paths["model"], root / name, edit)
    paths["nan_model"] = nan_model_dir(tok, root / "nan_model")
    paths["gguf_ok"] = write_gguf(root / "ok.gguf", model, tok)
    paths["gguf_align0"] = write_gguf(root / "align0.gguf", model, tok, {"general.alignment": 0})
    paths["gguf_heads0"] = write_gguf(root / "heads0.gguf", model, tok, {"llama.attention.head_count": 0})
    paths["gguf_str_number"] = write_gguf(root / "str.gguf", model, tok, {"llama.block_count": "two"})
    shard = "model-00001-of-00001.safetensors"
    paths["hf_index_list"] = hf_dir_with_index(model, tok, root / "hf_list", [shard])
    paths["hf_index_abs"] = hf_dir_with_index(model, tok, root / "hf_abs", {"embed": "/etc/hostname"})
    paths["hf_index_dotdot"] = hf_dir_with_index(model, tok, root / "hf_up", {"embed": f"../hf_abs/{shard}"})
    paths["text"] = root / "text.txt"
    paths["text"].write_text("hello world\nsecond line\n")
    paths["empty"] = root / "empty.txt"
    paths["empty"].write_text("\n  \n")
    paths["badjsonl"] = root / "bad.jsonl"
    paths["badjsonl"].write_text('{"text": "ok"}\n{"text": \n')
    paths["labels"] = root / "labels.jsonl"
    paths["labels"].write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    paths["yaml_model_list"] = root / "model_list.yaml"
    paths["yaml_model_list"].write_text("model: [1, 2]\n")
    paths["metrics"] = root / "run"
    paths["metrics"].mkdir()
    (paths["metrics"] / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    return paths


@pytest.mark.parametrize("command,line,expected", TABLE, ids=[f"{c}:{i}" for i, (c, _, _) in enumerate(TABLE)])
def test_bad_input_fails_on_one_line_and_leaves_nothing(command, line, expected, files, tmp_path, monkeypatch,
                                                         capsys, caplog):
    import shlex

    monkeypatch.chdir(tmp_path)  # relative outputs (run, data, attention.png) would land here
    argv = shlex.split(line.format(**{k: str(v) for k, v in files.items()}))
    before, before_cwd = tree(files["root"]), tree(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code not in (0, None), out
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err + out
    assert expected in err, err
    assert not [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # logged lines reach stderr too
    assert tree(files["root"]) == before and tree(tmp_path) == before_cwd, "a failed command left files behind"


def test_the_table_covers_every_command_with_sixty_cases():
    from llmkit.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert commands == set(CASES), commands ^ set(CASES)
    assert len(TABLE) >= 60


def test_usage_errors_and_bare_commands_never_print_a_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No such option: --nope") and err.count("\n") == 1


def test_output_check_leaves_an_existing_tree_alone(tmp_path):
    from llmkit.utils import check_output

    (tmp_path / "sub").mkdir()
    assert check_output(tmp_path / "sub" / "new" / "deeper", "dir").name == "deeper"
    assert not (tmp_path / "sub" / "new").exists()  # checked, not created
    assert list((tmp_path / "sub").iterdir()) == []  # the write probe is gone
    shutil.rmtree(tmp_path / "sub")


def test_written_files_follow_the_umask(tmp_path):
    """Files were 0600 (mkstemp's mode) whatever the umask: a shared model dir was unreadable to others."""
    import os

    from conftest import FOX_TEXT as TEXT
    from llmkit.data.corpus import prepare

    old = os.umask(0o022)
    try:
        tok = fox_tokenizer()
        model_dir = save_checkpoint(tmp_path / "model", fox_model(tok), tok)
        (tmp_path / "corpus.txt").write_text(TEXT * 20)
        prepare([tmp_path / "corpus.txt"], tmp_path / "data", tok)
        os.umask(0o077)
        (tmp_path / "private").mkdir()
        save_checkpoint(tmp_path / "private" / "model", fox_model(tok), tok)
    finally:
        os.umask(old)
    for path in [*model_dir.iterdir(), *(tmp_path / "data").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o755
    for path in (tmp_path / "private" / "model").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_eval_accepts_every_model_generate_accepts(files, tmp_path, capsys):
    """HF exports and GGUF files ended in "no such model" or a traceback; now eval resolves --model
    as generate does, and writes --output for perplexity too."""
    from llmkit.io.hf import save_hf
    from llmkit.io.resolve import resolve_model

    model, tok = resolve_model(files["model"])
    hf_dir = save_hf(model, tok, tmp_path / "hf")
    losses = {}
    for name, path in (("llmkit", files["model"]), ("hf", hf_dir), ("gguf", files["gguf_ok"])):
        out = tmp_path / f"{name}.json"
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", str(path), "--text", str(files["text"]), "--json", "--output", str(out)])
        assert exit_info.value.code == 0, capsys.readouterr().err
        losses[name] = json.loads(capsys.readouterr().out)["loss"]
        assert json.loads(out.read_text())["loss"] == losses[name]
    assert losses["hf"] == pytest.approx(losses["llmkit"], abs=1e-5)  # the same weights, exported


def test_chat_with_long_default_replies_on_a_short_context_model():
    """`llmkit chat --model runs/demo/model` failed at once: 256-token replies in a 64-token context.
    Now the reply takes the room left, and old turns are dropped as the conversation grows."""
    from llmkit.infer.chat import ChatSession
    from llmkit.infer.sampling import SamplingParams

    tok = fox_tokenizer()
    session = ChatSession(fox_model(tok), tok, params=SamplingParams(max_new_tokens=256, temperature=0))
    for text in ("the quick brown fox", "to be or not to be", "that is the question"):
        session.reply(text)
    assert len(tok.encode(session.prompt())) <= 64 // 2  # half the context stays free for the reply
    assert len(session.messages) == 6 and "that is the question" in session.prompt()
