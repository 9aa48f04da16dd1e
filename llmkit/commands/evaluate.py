"""Commands that measure or convert models: eval, convert, plot, attention."""
from __future__ import annotations

from pathlib import Path

import typer

from llmkit.cli_help import epilog
from llmkit.commands import app
from llmkit.errors import LlmkitError
from llmkit.utils import check_output



@app.command("eval", epilog=epilog("eval"))
def eval_(
    model: str = typer.Option(..., "--model", help="model dir (config.json + model.safetensors)"),
    text: str = typer.Option(None, "--text", help="plain-text file to score"),
    data: str = typer.Option(None, "--data", help="prepared data dir to score"),
    split: str = typer.Option("val", "--split", help="split of --data: train or val"),
    batch_size: int = typer.Option(8, "--batch-size"),
    stride: int = typer.Option(None, "--stride", help="window stride (default: block_size, no overlap)"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="score only the first N tokens"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    mc: str = typer.Option(None, "--mc", help="multiple-choice JSONL (question, choices, answer): accuracy"),
    gen: str = typer.Option(None, "--gen", help="generation JSONL (prompt, reference): exact match, BLEU, chrF, ROUGE"),
    chat: bool = typer.Option(False, "--chat", help="--mc/--gen: ask through the model's chat template"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="--gen: longest answer in tokens"),
    num_beams: int = typer.Option(1, "--num-beams", help="--gen: beam search with this many beams (1 = greedy)"),
    output: str = typer.Option(None, "--output", help="also write all results (with per-item predictions) as JSON"),
    qa: str = typer.Option(None, "--qa", help="SQuAD-style JSONL for a QA model: exact match and F1"),
):
    """Perplexity on text or a data split; with --mc/--gen also task scores, as a table (or --json)."""
    import json

    from llmkit.utils import atomic_open

    if output is not None:
        check_output(output, "file", "--output")
    if qa:
        _eval_qa(model, qa, device, as_json, output)
        return

    if mc or gen:  # task scoring: any model resolve_model loads; --text adds perplexity to the table
        from llmkit.eval.lm import evaluate_tasks, results_table

        if data:
            raise LlmkitError("--data cannot be combined with --mc/--gen; use --text for perplexity")
        results = evaluate_tasks(model, text_file=text, mc_file=mc, gen_file=gen, batch_size=batch_size,
                                 chat=chat, max_new_tokens=max_new_tokens, device=device, num_beams=num_beams)
        if output:
            with atomic_open(output) as f:
                json.dump(results, f, indent=2)
        summary = [{k: v for k, v in r.items() if k != "predictions"} for r in results]
        print(json.dumps(summary) if as_json else results_table(summary))
        return

    from llmkit.eval.lm import evaluate_model

    result = evaluate_model(model, text_file=text, data_dir=data, split=split, batch_size=batch_size,
                            stride=stride, max_tokens=max_tokens, device=device)
    if output is not None:
        with atomic_open(output) as f:
            json.dump(result, f, indent=2)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{result['source']}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"({result['tokens']} tokens)")


@app.command("convert", epilog=epilog("convert"))
def convert_cmd(
    src: str = typer.Argument(..., help="llmkit or HF model dir, .gguf file, or smollm2-135m-instruct"),
    dst: str = typer.Argument(..., help="output directory (a .gguf file with --to gguf)"),
    to: str = typer.Option("llmkit", "--to", help="llmkit, hf or gguf"),
    gguf_type: str = typer.Option("f16", "--type", help="GGUF tensors: f32, f16, q8_0, q4_0 or q4_1"),
):
    """Convert a GGUF, HF or llmkit checkpoint into an llmkit (or, with --to hf, a Hugging Face) directory,
    or with --to gguf into a GGUF file that llama.cpp and transformers load."""
    from llmkit.io.encoders import is_encoder
    from llmkit.io.resolve import convert

    check_output(dst, "dir", "DST")
    if to == "hf" and is_encoder(src):  # BERT-style encoders, with their MLM / NSP heads
        from llmkit.io.encoders import load_encoder
        from llmkit.io.bert_export import save_hf_bert

        print(f"wrote hf model to {save_hf_bert(*load_encoder(src), dst)}")
        return
    out = convert(src, dst, to=to, gguf_type=gguf_type)
    print(f"wrote {to} model to {out}")


def _int_list(value: str | None, what: str) -> list[int] | None:
    """'0,2,-1' -> [0, 2, -1]; None or 'all' -> None (every one)."""
    if value is None or value.strip().lower() == "all":
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise LlmkitError(f"{what} must be comma-separated integers or 'all', got {value!r}") from None


@app.command("plot", epilog=epilog("plot"))
def plot_cmd(
    run: str = typer.Argument(..., help="run directory (with metrics.jsonl) or a metrics.jsonl file"),
    out: str = typer.Option(None, "--out", help="PNG to write (default: metrics.png beside the metrics)"),
):
    """Draw a run's loss, learning-rate and throughput curves into a PNG."""

    from llmkit.eval.plot import plot_metrics

    base = Path(run) if Path(run).is_dir() else Path(run).parent
    out = check_output(out or base / "metrics.png", "file")
    print(f"wrote {plot_metrics(run, out)}")


@app.command("attention", epilog=epilog("attention"))
def attention_cmd(
    text: str = typer.Argument(..., help="text whose attention to draw"),
    model: str = typer.Option(..., "--model", help="llmkit/HF dir, .gguf, or a short name"),
    layers: str = typer.Option("-1", "--layers", help="comma-separated layer indices (negative from the end) or all"),
    heads: str = typer.Option("all", "--heads", help="comma-separated head indices or all"),
    out: str = typer.Option("attention.png", "--out", help="PNG to write"),
):
    """Draw the attention maps of chosen layers/heads for a text as a PNG heatmap grid."""
    from llmkit.io.resolve import resolve_model
    from llmkit.eval.plot import attention_png

    check_output(out, "file")
    layer_list, head_list = _int_list(layers, "--layers"), _int_list(heads, "--heads")
    net, tokenizer = resolve_model(model)
    print(f"wrote {attention_png(net, tokenizer, text, out, layer_list, head_list)}")


def _eval_qa(model: str, data: str, device: str, as_json: bool, output: str | None) -> None:
    """`eval --qa`: exact match and F1 of a span-QA model (SQuAD scoring)."""
    import json

    from llmkit.train.qa import evaluate_qa
    from llmkit.utils import atomic_open

    result = evaluate_qa(model, data, device="cpu" if device == "auto" else device)
    if output:
        with atomic_open(output) as f:
            json.dump(result, f, indent=2)
    summary = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(summary) if as_json else
          f"{data}: exact_match {summary['exact_match']:.2f}  f1 {summary['f1']:.2f}  ({summary['examples']} questions)")
