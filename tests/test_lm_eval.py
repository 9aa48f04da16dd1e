"""EleutherAI lm-eval harness on llmkit models, run offline on a tiny local task directory."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_model_dir, write_jsonl

pytest.importorskip("lm_eval")

MC = [{"question": "capital of zorbia?", "choices": ["quibble", "frobnitz", "paris"], "answer": 0},
      {"question": "the cat sat on the?", "choices": ["mat", "rome"], "answer": 0},
      {"question": "yonder?", "choices": ["blue", "green", "berlin"], "answer": 2}]
GEN = [{"question": "the cat", "answer": "sat"}, {"question": "capital of", "answer": "zorbia"}]
# lm-eval's own command: the installed llmkit_lm_eval_hook.pth makes it know `--model llmkit`
LM_EVAL = str(Path(sys.executable).parent / "lm_eval")


def run_lm_eval(tmp_path, args: list[str], cwd=None) -> dict:
    """`lm_eval --model llmkit ...` offline with its caches under tmp_path; the results JSON's "results"."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"), "HF_HOME": str(tmp_path / "hf-home")}
    done = subprocess.run([LM_EVAL, "--model", "llmkit", *args, "--output_path", str(tmp_path / "out")],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]


def task_dir(root):
    """Three tasks, one per request type lm-eval sends: loglikelihood, generate_until, rolling."""
    mc = write_jsonl(root / "mc.jsonl", MC)
    gen = write_jsonl(root / "gen.jsonl", GEN)
    tasks = root / "tasks"
    tasks.mkdir()
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: llmkit_tiny_mc\n" + common.format(mc) + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n")
    (tasks / "gen.yaml").write_text(
        "task: llmkit_tiny_gen\n" + common.format(gen) + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\nmetric_list:\n  - metric: exact_match\n')
    (tasks / "roll.yaml").write_text(
        "task: llmkit_tiny_roll\n" + common.format(gen) + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{question}} {{answer}}"\nmetric_list:\n  - metric: word_perplexity\n')
    return tasks


@pytest.mark.slow
def test_lm_eval_runs_llmkit_model_on_local_tasks(tmp_path):
    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.eval.lm import multiple_choice, perplexity

    model_dir = tiny_model_dir(tmp_path / "model")
    tasks = task_dir(tmp_path)
    results = run_lm_eval(tmp_path, ["--model_args", f"path={model_dir}", "--tasks",
                                     "llmkit_tiny_mc,llmkit_tiny_gen,llmkit_tiny_roll", "--include_path", str(tasks),
                                     "--batch_size", "2", "--log_samples"])
    assert set(results) == {"llmkit_tiny_mc", "llmkit_tiny_gen", "llmkit_tiny_roll"}

    # lm-eval's accuracy is what llmkit's own multiple-choice scoring finds with the same prompt
    model, tok = load_checkpoint(model_dir)
    ours = multiple_choice(model, tok, MC)
    assert results["llmkit_tiny_mc"]["acc,none"] == pytest.approx(ours["acc"])
    # word perplexity = exp(total NLL / words), the NLL from llmkit's own perplexity windows
    total_nll, words = 0.0, 0
    for g in GEN:
        text = f"{g['question']} {g['answer']}"
        scored = perplexity(model, [tok.eos_id] + tok.encode(text))
        total_nll += scored["loss"] * scored["tokens"]
        words += len(text.split())
    assert results["llmkit_tiny_roll"]["word_perplexity,none"] == pytest.approx(math.exp(total_nll / words), rel=1e-4)
    assert 0.0 <= results["llmkit_tiny_gen"]["exact_match,none"] <= 1.0


@pytest.mark.slow
def test_shipped_example_task_runs(tmp_path):
    """README's command on the example task directory (run from the repository root, as documented)."""
    repo = Path(__file__).resolve().parents[1]
    model_dir = tiny_model_dir(tmp_path / "model")
    results = run_lm_eval(tmp_path, ["--model_args", f"path={model_dir}", "--tasks", "llmkit_example_mc",
                                     "--include_path", "examples/lm_eval_tasks", "--device", "cpu"], cwd=repo)
    from llmkit.io.checkpoint import load_checkpoint
    from llmkit.eval.lm import multiple_choice, read_mc_items

    model, tok = load_checkpoint(model_dir)
    ours = multiple_choice(model, tok, read_mc_items(repo / "examples/data/mc.jsonl"))
    assert results["llmkit_example_mc"]["acc,none"] == pytest.approx(ours["acc"])


def test_start_up_hook_is_installed_and_imports_nothing_heavy():
    """The .pth hook runs in every interpreter of the environment: it must not pull in lm-eval or torch."""
    code = ("import sys; from llmkit_lm_eval_hook import _RegisterAfterLmEvalModels as F; "
            "print(any(isinstance(f, F) for f in sys.meta_path), 'lm_eval' in sys.modules, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "False", "False"], done.stderr
