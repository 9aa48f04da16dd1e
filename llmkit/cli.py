"""The `llmkit` command: one sub-command per verb, each a thin wrapper over the library."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from llmkit.errors import LlmkitError
from llmkit.cli_help import DECODER_PRESETS, ENCODER_PRESETS, epilog
from llmkit.utils import check_device, check_output, check_range

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llmkit: from raw text to a served chat model.")


@app.command(epilog=epilog("demo"))
def demo(
    out: str = typer.Option("runs/demo", "--out", help="where the corpus, data and model go"),
    max_steps: int = typer.Option(None, "--max-steps", help="training steps (default: about two minutes)"),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="end by asking the embedded chat model a question"),
):
    """The main job on embedded defaults: tokenizer, data, training, samples, then a pretrained chat."""
    from llmkit import demo as demo_module

    check_output(out, "dir")
    if max_steps is not None:
        check_range("--max-steps", max_steps, 1, integer=True)
    demo_module.run(out, max_steps=max_steps, chat=chat)


@app.command(context_settings={"allow_interspersed_args": True}, epilog=epilog("train"))
def train(
    args: list[str] = typer.Argument(None, metavar="[CONFIG.yaml] [KEY=VALUE]...",
                                     help="optional YAML config, then overrides like lr=3e-4 model.n_layer=6"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in out_dir"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the checkpoint already in out_dir"),
    init_from: str = typer.Option(None, "--init-from", help="start from this model's weights (continued "
                                  "pretraining): a model name, .gguf, llmkit or HF dir; prepare with its tokenizer"),
    data: str = typer.Option(None, "--data", help="prepared data dir (data_dir=...)"),
    out: str = typer.Option(None, "--out", help="output model dir (out_dir=...)"),
    preset: str = typer.Option(None, "--preset", help=f"model preset: {', '.join(DECODER_PRESETS)} (decoders); "
                                                      f"{', '.join(ENCODER_PRESETS)} (encoders)"),
    max_steps: int = typer.Option(None, "--max-steps", help="optimizer steps to train for"),
    objective: str = typer.Option(None, "--objective", help="causal (default), mlm or contrastive (encoders), "
                                                          "seq2seq (encoder-decoder, on `prepare --pairs` data)"),
    base_model: str = typer.Option(None, "--model", help="model to start from (--objective contrastive: an encoder; "
                                                         "seq2seq: a Marian/BART/T5 or llmkit seq2seq dir)"),
):
    """Train a model on a prepared data dir (single process, or under torchrun for DDP)."""
    from llmkit.train.losses import ENCODER_OBJECTIVES
    from llmkit.train.trainer import Trainer, load_train_config

    args = list(args or [])
    config_file = args.pop(0) if args and "=" not in args[0] else None
    config = load_train_config(config_file, args, data_dir=data, out_dir=out, preset=preset, max_steps=max_steps,
                               objective=objective, init_from=init_from, overwrite=overwrite or None)
    check_output(config.out_dir, "dir", "out_dir")
    if config.objective == "seq2seq":
        from llmkit.train.seq2seq import Seq2SeqTrainer

        trainer = Seq2SeqTrainer(config, model=base_model, resume=resume)
    elif config.objective in ENCODER_OBJECTIVES:
        from llmkit.train.encoder import EncoderTrainer

        trainer = EncoderTrainer(config, model=base_model, resume=resume)
    elif base_model is not None:
        raise LlmkitError("--model is for encoder objectives (contrastive); decoders start from --preset")
    else:
        trainer = Trainer(config, resume=resume)
    metrics = trainer.fit()
    if trainer.dist.is_main and "loss" in metrics:
        val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        print(f"step {metrics['step']}: loss {metrics['loss']:.4f}{val}; model saved to {config.out_dir}")


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


@app.command("generate", epilog=epilog("generate"))
def generate_cmd(
    prompt: str = typer.Argument(None, help="text to continue (or use --prompt-file)"),
    model: str = typer.Option(..., "--model", help="llmkit or HF model dir, .gguf file, or smollm2-135m-instruct"),
    prompt_file: str = typer.Option(None, "--prompt-file", help="a batch of prompts, one per line"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(None, "--top-k"),
    top_p: float = typer.Option(None, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    stop: list[str] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    seed: int = typer.Option(None, "--seed"),
    num_samples: int = typer.Option(1, "--num-samples"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, mps or auto"),
    dtype: str = typer.Option(None, "--dtype", help="float32 (default), bfloat16 or float16 (half the bytes "
                                                    "read per token, so faster decoding), or quantized: a GGUF's "
                                                    "q8_0/q4_0/q4_1 blocks kept as they are"),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="print each prompt before its completion"),
    num_beams: int = typer.Option(1, "--num-beams", help="beam search with this many beams (deterministic)"),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="beams: >0 favours longer outputs"),
    early_stopping: str = typer.Option("false", "--early-stopping", help="beams: true, false or never"),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="beams: forbid repeated n-grams"),
    num_return_sequences: int = typer.Option(1, "--num-return-sequences", help="beams: best N outputs per prompt"),
    json_schema: str = typer.Option(None, "--json-schema", help="JSON schema file: the output is JSON following it"),
):
    """Continue a prompt, streaming tokens to stdout; --prompt-file runs a batch and prints each completion."""
    from llmkit.infer.generate import SamplingParams, generate, stream
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.resolve import resolve_model

    if (prompt is None) == (prompt_file is None):
        raise LlmkitError("give either a PROMPT or --prompt-file, not both or neither")
    if num_samples < 1:
        raise LlmkitError(f"--num-samples must be >= 1, got {num_samples}")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=tuple(stop or ()), seed=seed,
                            json_schema=_read_schema(json_schema))
    device = check_device(device)
    beam = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                no_repeat_ngram_size=no_repeat_ngram_size, num_return_sequences=num_return_sequences)
    use_beams = num_beams != 1 or no_repeat_ngram_size != 0 or num_return_sequences != 1
    if use_beams:
        from llmkit.infer.beam import BeamParams

        BeamParams(max_new_tokens=max_new_tokens, **beam)  # bad values fail before the model loads
    net, tokenizer = resolve_model(model, device=device, dtype=dtype)
    if use_beams or getattr(net, "arch", None) == "seq2seq":  # an encoder-decoder answers whole outputs
        _print_beams(net, tokenizer, [prompt] if prompt_file is None else _read_prompts(prompt_file), params, beam, echo)
        return
    optimize_for_inference(net, single_row=prompt_file is None)
    if prompt_file is None:
        for i in range(num_samples):
            if i:
                print("\n---")
            sys.stdout.write(prompt if echo else "")
            sample_seed = None if seed is None else seed + i  # one reproducible seed per sample
            for piece in stream(net, tokenizer, prompt, params, seed=sample_seed):
                sys.stdout.write(piece)
                sys.stdout.flush()
        print()
        return
    prompts = _read_prompts(prompt_file)
    batch = [p for p in prompts for _ in range(num_samples)]
    for i, (p, completion) in enumerate(zip(batch, generate(net, tokenizer, batch, params))):
        if i:
            print("---")
        print((p if echo else "") + completion)


def _read_schema(path: str | None) -> dict | None:
    import json

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LlmkitError(f"cannot read the JSON schema {path}: {e}") from None
    from llmkit.infer.structured import json_grammar

    json_grammar(schema)  # an unusable schema fails here, before the model loads
    return schema


@app.command("chat", epilog=epilog("chat"))
def chat_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model",
                              help="llmkit or HF model dir, .gguf file, or smollm2-135m-instruct"),
    system: str = typer.Option(None, "--system", help="system message for the whole conversation"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="longest reply, in tokens"),
    temperature: float = typer.Option(0.2, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(None, "--top-k"),
    top_p: float = typer.Option(0.9, "--top-p"),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, mps or auto"),
    dtype: str = typer.Option(None, "--dtype", help="float32 (default), bfloat16 or float16 (half the bytes "
                                                    "read per token, so faster decoding), or quantized: a GGUF's "
                                                    "q8_0/q4_0/q4_1 blocks kept as they are"),
):
    """Chat with a model: streamed replies, multi-turn history, /reset and /exit."""
    from llmkit.infer.chat import ChatSession, chat_loop
    from llmkit.infer.generate import SamplingParams
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.resolve import resolve_model

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    net, tokenizer = resolve_model(model, device=check_device(device), dtype=dtype)
    chat_loop(ChatSession(optimize_for_inference(net, single_row=True), tokenizer, system=system, params=params))


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


@app.command("prepare", epilog=epilog("prepare"))
def prepare_cmd(
    inputs: list[str] = typer.Argument(..., help=".txt / .jsonl files or directories of them"),
    out: str = typer.Option(..., "--out", help="output data directory"),
    tokenizer: str = typer.Option("bpe", "--tokenizer", help="bpe, char, a tokenizer.json to reuse, or a model "
                                  "whose tokenizer to use (for train --init-from)"),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="vocabulary size when training bpe"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of documents (or tail tokens) for val"),
    seed: int = typer.Option(0, "--seed", help="seed of the train/val document split"),
    pairs: bool = typer.Option(False, "--pairs", help="JSONL {source, target} pairs for --objective seq2seq "
                                                      "(one joint vocabulary for both sides)"),
):
    """Tokenize text into train.bin / val.bin (+ meta.json, tokenizer.json) for `llmkit train`."""
    from llmkit.data.corpus import iter_texts, prepare
    from llmkit.tokenizer import Tokenizer

    check_output(out, "dir")
    check_range("--val-fraction", val_fraction, 0, 1, high_open=True)
    if pairs:
        _prepare_pairs(inputs, out, tokenizer, vocab_size, val_fraction, seed)
        return
    if tokenizer == "bpe":
        check_range("--vocab-size", vocab_size, 256, integer=True)
        tok = Tokenizer.train_bpe(iter_texts(inputs), vocab_size)
    elif tokenizer == "char":
        tok = Tokenizer.train_char(iter_texts(inputs))
    elif tokenizer.endswith(".json") or (Path(tokenizer) / "tokenizer.json").is_file():
        tok = Tokenizer.load(tokenizer)
    else:  # a model name, .gguf file or model directory
        from llmkit.io.resolve import load_tokenizer

        tok = load_tokenizer(tokenizer)
    meta = prepare(inputs, out, tok, val_fraction=val_fraction, seed=seed)
    print(f"{meta['documents']} documents -> {meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
          f"tokens ({meta['dtype']}, vocab {meta['vocab_size']}) in {out}")


@app.command("serve", epilog=epilog("serve"))
def serve_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model",
                              help="decoder (llmkit/HF dir, .gguf, short name), an encoder for embeddings, "
                                   "or none"),
    embedding_model: str = typer.Option(None, "--embedding-model", help="encoder served at /v1/embeddings too"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8000, "--port"),
    api_key: str = typer.Option(None, "--api-key", envvar="LLMKIT_API_KEY",
                                help="require 'Authorization: Bearer KEY' on /v1 and /metrics"),
    max_batch: int = typer.Option(16, "--max-batch", help="sequences decoded together (1 = one at a time)"),
    max_queue: int = typer.Option(128, "--max-queue", help="waiting sequences before HTTP 429"),
    context: int = typer.Option(None, "--context", help="tokens per sequence, prompt + output (default: model's)"),
    timeout: float = typer.Option(600.0, "--timeout", help="seconds a request may take, queueing included"),
    max_body: int = typer.Option(1 << 20, "--max-body", help="largest request body in bytes"),
    dtype: str = typer.Option(None, "--dtype", help="decoder weights: float32 (default), bfloat16, float16 "
                                                           "or quantized (a GGUF's blocks kept)"),
    name: str = typer.Option(None, "--name", help="model id clients send as \"model\" (default: from the path)"),
    nlu: list[str] = typer.Option(None, "--nlu", help="NLU model served at /v1/classify and /v1/tag: an "
                                                      "intent-slots model, or a classify and a tag model"),
    dialog: str = typer.Option(None, "--dialog", help="dialogue domain YAML served at /v1/dialog (needs --nlu)"),
    cors_origin: list[str] = typer.Option(None, "--cors-origin",
                                          help="browser origin allowed to call the API (repeatable; '*' for any)"),
    allowed_host: list[str] = typer.Option(None, "--allowed-host",
                                           help="extra Host name to answer (repeatable; on loopback only "
                                                "localhost names are answered)"),
):
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/."""
    from llmkit.serve import serve

    check_range("--port", port, 1, 65535, integer=True)
    check_range("--max-batch", max_batch, 1, integer=True)
    check_range("--max-queue", max_queue, 1, integer=True)
    if context is not None:
        check_range("--context", context, 1, integer=True)
    check_range("--timeout", timeout, 0, low_open=True)
    check_range("--max-body", max_body, 1, integer=True)
    serve(model, host=host, port=port, embedding_model=embedding_model, api_key=api_key, max_batch=max_batch,
          max_queue=max_queue, context=context, timeout=timeout, max_body_bytes=max_body, dtype=dtype,
          nlu=nlu or None, dialog=dialog, name=name, cors_origins=cors_origin or None,
          allowed_hosts=allowed_host or None)


def _int_list(value: str | None, what: str) -> list[int] | None:
    """'0,2,-1' -> [0, 2, -1]; None or 'all' -> None (every one)."""
    if value is None or value.strip().lower() == "all":
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise LlmkitError(f"{what} must be comma-separated integers or 'all', got {value!r}") from None


@app.command("distill", context_settings={"allow_interspersed_args": True}, epilog=epilog("distill"))
def distill_cmd(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="training settings, e.g. lr=1e-3"),
    teacher: str = typer.Option(..., "--teacher", help="teacher: llmkit/HF dir, .gguf, or a short name"),
    student: str = typer.Option(..., "--student", help=f"student: a preset ({', '.join(DECODER_PRESETS)}), "
                                                        "trained from scratch, or a model dir"),
    data: str = typer.Option(..., "--data", help="prepared data dir, tokenized with the teacher's tokenizer"),
    out: str = typer.Option("runs/distill", "--out", help="output model dir"),
    temperature: float = typer.Option(2.0, "--temperature", help="softening of both distributions"),
    alpha: float = typer.Option(0.5, "--alpha", help="weight of the soft (teacher) loss; 1 - alpha on the labels"),
    top_k: int = typer.Option(None, "--top-k", help="precompute the teacher's top-k logits once instead of running it"),
    max_steps: int = typer.Option(None, "--max-steps"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in --out"),
):
    """Train a smaller student to match a teacher's next-token distributions."""
    from llmkit.train.distill import run_distill

    check_output(out, "dir")
    check_range("--temperature", temperature, 0, low_open=True)
    check_range("--alpha", alpha, 0, 1)
    if top_k is not None:
        check_range("--top-k", top_k, 1, integer=True)
    if max_steps is not None:
        check_range("--max-steps", max_steps, 1, integer=True)
    metrics = run_distill(teacher, student, data, out, overrides or [], temperature=temperature, alpha=alpha,
                          top_k=top_k, max_steps=max_steps, resume=resume)
    if "loss" in metrics:
        val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        print(f"step {metrics['step']}: loss {metrics['loss']:.4f}{val}; student saved to {out}")


@app.command("plot", epilog=epilog("plot"))
def plot_cmd(
    run: str = typer.Argument(..., help="run directory (with metrics.jsonl) or a metrics.jsonl file"),
    out: str = typer.Option(None, "--out", help="PNG to write (default: metrics.png beside the metrics)"),
):
    """Draw a run's loss, learning-rate and throughput curves into a PNG."""
    from pathlib import Path

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


@app.command("embed", epilog=epilog("embed"))
def embed_cmd(
    input_file: str = typer.Argument(..., metavar="FILE", help="text file, one sentence per line"),
    model: str = typer.Option("all-minilm-l6-v2", "--model",
                              help="all-minilm-l6-v2, an llmkit encoder dir or a HF BERT/RoBERTa dir"),
    out: str = typer.Option(None, "--out", "-o", help="output .jsonl or .npy (default: JSONL on stdout)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
):
    """Normalised sentence embeddings of each line of FILE, as JSONL {"text", "embedding"} or a .npy matrix."""
    from llmkit.infer.embed import embed_texts, jsonl_lines, write_embeddings
    from llmkit.io.encoders import load_encoder, read_lines
    from llmkit.infer.cpu import optimize_for_inference

    if out is not None and not out.endswith((".jsonl", ".npy")):
        raise LlmkitError(f"--out {out} must end in .jsonl or .npy")
    if out is not None:
        check_output(out, "file")
    check_range("--batch-size", batch_size, 1, integer=True)
    device = check_device(device)
    texts = read_lines(input_file)
    net, tokenizer = load_encoder(model, device=device)
    vectors = embed_texts(optimize_for_inference(net), tokenizer, texts, batch_size=batch_size)
    if out is None:
        sys.stdout.writelines(jsonl_lines(texts, vectors))
    else:
        write_embeddings(out, vectors, texts)
        print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}", file=sys.stderr)


FINETUNE_TASKS = {"classify": "sequence classification, JSONL {text, label}",
                  "tag": "token classification (BIO tags), JSONL {tokens, tags}",
                  "intent-slots": "one encoder, an intent head and a slot (BIO) head trained jointly, "
                                  "JSONL {tokens, tags, label}",
                  "qa": "extractive question answering (a span head), SQuAD-style JSONL {context, question, answers}",
                  "sft": "chat fine-tuning of a decoder (full or --lora), JSONL {messages: [{role, content}, ...]}"}


@app.command("finetune", epilog=epilog("finetune"))
def finetune_cmd(
    data: str = typer.Argument(None, help="training data (JSONL; format depends on --task), or --data"),
    data_option: str = typer.Option(None, "--data", help="the training data, as an option"),
    task: str = typer.Option(..., "--task", help="; ".join(f"{k}: {v}" for k, v in FINETUNE_TASKS.items())),
    model: str = typer.Option(..., "--model", help="base model (for classify/tag: an encoder or all-minilm-l6-v2)"),
    out: str = typer.Option(..., "--out", help="output model dir"),
    val: str = typer.Option(None, "--val", help="validation JSONL (default: hold out a tenth of the data)"),
    epochs: int = typer.Option(5, "--epochs"),
    lr: float = typer.Option(5e-5, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
    lora: bool = typer.Option(False, "--lora", help="sft: train low-rank adapters only (try --lr 1e-3)"),
    lora_rank: int = typer.Option(8, "--lora-rank", help="sft --lora: adapter rank"),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="sft --lora: scale alpha/rank of the update"),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="sft --lora: dropout on the adapter input"),
    lora_targets: str = typer.Option("all-linear", "--lora-targets",
                                     help="sft --lora: comma-separated layers (qkv,proj,gate_up,fc) or all-linear"),
    max_steps: int = typer.Option(None, "--max-steps", help="sft: optimizer steps (default: --epochs passes)"),
    block_size: int = typer.Option(512, "--block-size", help="sft: longest sequence; longer chats are truncated"),
    pack: bool = typer.Option(False, "--pack", help="sft: pack chats into full rows instead of padding"),
    merge: bool = typer.Option(True, "--merge/--no-merge", help="sft --lora: also save the merged model in --out"),
    resume: bool = typer.Option(False, "--resume", help="sft: continue from the checkpoint in --out"),
    settings: list[str] = typer.Option(None, "--set", help="sft: trainer KEY=VALUE (repeatable): grad_accum=4, "
                                                            "dtype=bfloat16, ckpt_interval=100, threads=1, ..."),
):
    """Fine-tune a model for a task and save it to --out; prints validation metrics per epoch."""
    if (data is None) == (data_option is None):
        raise LlmkitError("give the training data once: as DATA or as --data")
    data = data or data_option
    if task not in FINETUNE_TASKS:
        raise LlmkitError(f"unknown --task {task!r}; choose from {', '.join(FINETUNE_TASKS)}")
    check_output(out, "dir")
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--lora-rank", lora_rank),
                        ("--block-size", block_size), ("--max-steps", max_steps)):
        if value is not None:
            check_range(name, value, 1, integer=True)
    check_range("--lr", lr, 0, low_open=True)
    check_range("--lora-alpha", lora_alpha, 0, low_open=True)
    check_range("--lora-dropout", lora_dropout, 0, 1, high_open=True)
    device = check_device(device)
    if task == "sft":
        from llmkit.model.lora import LoRAConfig
        from llmkit.train.sft import run_sft

        adapters = LoRAConfig(lora_rank, lora_alpha, lora_dropout, lora_targets) if lora else None
        metrics = run_sft(model, data, out, val=val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          device=device, lora=adapters, max_steps=max_steps, block_size=block_size, pack=pack,
                          merge=merge, resume=resume, settings=settings or [],
                          log=lambda line: print(line, file=sys.stderr))
        val_text = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        print(f"step {metrics.get('step')}: loss {metrics.get('loss', float('nan')):.4f}{val_text}; saved to {out}")
        return
    if task in ("classify", "tag"):
        from llmkit.train.tasks import FinetuneConfig, finetune, format_metrics

        config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
        metrics = finetune(model, data, out, task, val_path=val, config=config,
                           log=lambda line: print(line, file=sys.stderr))
        print(f"{format_metrics(metrics) or 'no validation data'}; model saved to {out}")
        return
    if task in ("intent-slots", "qa"):  # several-head recipes: one model, jointly trained heads
        from llmkit.train.tasks import FinetuneConfig
        from llmkit.train.multitask import finetune_intent_slots
        from llmkit.train.qa import finetune_qa

        run, keys = ((finetune_intent_slots, ("intent_accuracy", "slot_f1")) if task == "intent-slots"
                     else (finetune_qa, ("exact_match", "f1")))
        config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
        metrics = run(model, data, out, val_path=val, config=config, log=lambda line: print(line, file=sys.stderr))
        shown = "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
        print(f"{shown or 'no validation data'}; model saved to {out}")
        return
    raise LlmkitError(f"unknown --task {task!r}; choose from {', '.join(FINETUNE_TASKS)}")


@app.command("predict", epilog=epilog("predict"))
def predict_cmd(
    input_file: str = typer.Argument(..., metavar="FILE",
                                     help="JSONL ({text} or {tokens}, gold label/tags optional) or .txt lines"),
    model: str = typer.Option(..., "--model", help="a model fine-tuned with `llmkit finetune --task classify|tag`"),
    out: str = typer.Option(None, "--out", "-o", help="output JSONL (default: stdout)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
):
    """Predict a label per text (classify) or a tag per word (tag); scores the predictions when gold is given."""
    from llmkit.train.multitask import is_joint
    from llmkit.train.tasks import format_metrics, run_predict

    if out is not None:
        check_output(out, "file")
    check_range("--batch-size", batch_size, 1, integer=True)
    device = check_device(device)
    if is_joint(model):
        _predict_joint(model, input_file, out, device)
        return
    metrics = run_predict(model, input_file, out, batch_size=batch_size, device=device)
    if metrics is not None:
        print(f"{metrics['examples']} labelled examples: {format_metrics(metrics)}", file=sys.stderr)


@app.command("quantize", epilog=epilog("quantize"))
def quantize_cmd(
    model: str = typer.Argument(..., help="llmkit or HF model dir, .gguf file, or smollm2-135m-instruct"),
    to: str = typer.Option(..., "--to", help="q8_0, q4_0 or q4_1"),
    out: str = typer.Option(..., "--out", help="output directory (an llmkit model with quantized blocks)"),
    text: str = typer.Option(..., "--text", help="text file: its first 90%% calibrates gptq, its last 10%% "
                                                 "is the held-out perplexity text"),
    method: str = typer.Option("rtn", "--method", help="rtn (round to nearest) or gptq (calibrated)"),
    eval_text: str = typer.Option(None, "--eval", help="held-out text for perplexity instead of --text's tail"),
):
    """Quantize a model's linear layers into 32-value blocks; prints perplexity before and after."""
    from llmkit.compress.quantize import quantize_command

    check_output(out, "dir")
    r = quantize_command(model, out, to, method, text, eval_text)
    print(f"{r['format']} ({r['method']}): perplexity {r['perplexity_before']:.3f} -> {r['perplexity_after']:.3f} "
          f"on {r['tokens']} held-out tokens; wrote {r['out']}")


@app.command("dialog", epilog=epilog("dialog"))
def dialog_cmd(
    domain: str = typer.Argument(..., help="domain YAML: intents, slots, required slots, prompts, actions"),
    nlu: list[str] = typer.Option(..., "--nlu", help="an intent-slots model (or a classify and a tag model)"),
    reply: str = typer.Option("template", "--reply", help="template, or chat: the chat model words each reply"),
    chat_model: str = typer.Option("smollm2-135m-instruct", "--chat-model", help="--reply chat: the chat model"),
    actions: str = typer.Option(None, "--actions", help="append each executed action to this JSONL file"),
    show_state: bool = typer.Option(False, "--show-state", help="print the NLU result and state after each turn"),
):
    """Talk to a task-oriented dialogue system in the terminal (NLU -> state tracking -> policy -> reply)."""
    from llmkit.apps.dialog import ChatReplier, Dialog, dialog_loop
    from llmkit.apps.domain import load_domain
    from llmkit.apps.nlu import NLU

    if reply not in ("template", "chat"):
        raise LlmkitError(f"--reply must be template or chat, got {reply!r}")
    if actions is not None:
        check_output(actions, "file", "--actions")
    session = Dialog(load_domain(domain), NLU.load(*nlu))
    if reply == "chat":
        from llmkit.infer.cpu import optimize_for_inference
        from llmkit.io.resolve import resolve_model

        net, tokenizer = resolve_model(chat_model)
        session.replier = ChatReplier(optimize_for_inference(net, single_row=True), tokenizer)
    dialog_loop(session, actions_file=actions, show_state=show_state)


@app.command("index", epilog=epilog("index"))
def index_cmd(
    docs: list[str] = typer.Argument(..., help=".txt/.md files, .jsonl ({id, text} per line), or directories"),
    model: str = typer.Option("all-minilm-l6-v2", "--model", help="embedding model (encoder)"),
    out: str = typer.Option(..., "--out", help="index directory to write"),
    chunk_words: int = typer.Option(80, "--chunk-words", help="words per chunk"),
    overlap: int = typer.Option(15, "--overlap", help="words shared by consecutive chunks"),
    batch_size: int = typer.Option(32, "--batch-size"),
):
    """Chunk documents, embed each chunk, and save a flat inner-product index for `llmkit ask`."""
    from llmkit.apps.retrieval import build_index, read_documents
    from llmkit.io.encoders import load_encoder

    check_output(out, "dir")
    check_range("--chunk-words", chunk_words, 1, integer=True)
    check_range("--overlap", overlap, 0, chunk_words - 1, integer=True)
    check_range("--batch-size", batch_size, 1, integer=True)
    documents = read_documents(docs)
    net, tokenizer = load_encoder(model)
    meta = build_index(documents, net, tokenizer, out, model, chunk_words, overlap, batch_size)
    print(f"indexed {meta['documents']} documents as {meta['chunks']} chunks ({meta['dim']} dims) in {out}")


@app.command("ask", epilog=epilog("ask"))
def ask_cmd(
    question: str = typer.Argument(None, help="the question (or --eval QUESTIONS.jsonl)"),
    index: str = typer.Option(..., "--index", help="index directory from `llmkit index`"),
    model: str = typer.Option(None, "--model", help="embedding model (default: the one the index was built with)"),
    k: int = typer.Option(4, "-k", help="chunks to retrieve"),
    chat_model: str = typer.Option("smollm2-135m-instruct", "--chat-model", help="model that writes the answer"),
    retrieve_only: bool = typer.Option(False, "--retrieve-only", help="print the retrieved chunks, no answer"),
    evaluate: str = typer.Option(None, "--eval", help="JSONL {question, doc}: print recall@1/3/5 instead"),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens"),
):
    """Answer a question from an index: retrieve the top chunks, answer with the chat model, cite them."""
    import json

    from llmkit.apps.retrieval import Index, answer_prompt, read_questions, recall_at_k
    from llmkit.infer.embed import embed_texts
    from llmkit.io.encoders import load_encoder

    if (question is None) == (evaluate is None) or k < 1:
        raise LlmkitError("give a QUESTION or --eval QUESTIONS.jsonl (not both), and -k >= 1")
    idx = Index(index)
    name = model or idx.meta["model"]
    net, tokenizer = load_encoder(name)
    idx.check_model(net, name)
    if evaluate:
        print(json.dumps(recall_at_k(idx, net, tokenizer, read_questions(evaluate))))
        return
    hits = idx.search(embed_texts(net, tokenizer, [question]), k)[0]
    sources = [f"[{n}] {h.doc} #{h.chunk} (score {h.score:.3f})" for n, h in enumerate(hits, 1)]
    if retrieve_only:
        for line, h in zip(sources, hits):
            print(f"{line}\n    {h.text[:300]}")
        return
    from llmkit.infer.chat import ask

    ask(answer_prompt(question, hits), model=chat_model, out=sys.stdout, max_new_tokens=max_new_tokens)
    print("sources:\n  " + "\n  ".join(sources))


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


def _predict_joint(model_path: str, input_file: str, out: str | None, device: str) -> None:
    """`predict` with a joint intent-slots model: intent, tags and slot values per line."""
    from llmkit.io.encoders import load_encoder
    from llmkit.train.multitask import run_predict_joint
    from llmkit.utils import atomic_open

    net, tokenizer = load_encoder(model_path, device)
    lines, metrics = run_predict_joint(net, tokenizer, input_file)
    if out is None:
        sys.stdout.writelines(lines)
    else:
        with atomic_open(out, encoding="utf-8") as f:
            f.writelines(lines)
    if metrics is not None:
        print(f"{metrics['examples']} labelled examples: intent_accuracy {metrics['intent_accuracy']:.4f}  "
              f"slot_f1 {metrics['slot_f1']:.4f}", file=sys.stderr)


@app.command("prune", epilog=epilog("prune"))
def prune_cmd(
    model: str = typer.Argument(..., help="llmkit or HF model dir, .gguf file, or a short name"),
    out: str = typer.Option(..., "--out", help="output llmkit model dir"),
    sparsity: float = typer.Option(None, "--sparsity", help="unstructured: fraction of weights to zero, in [0, 1)"),
    pattern: str = typer.Option(None, "--pattern", help="semi-structured N:M, e.g. 2:4"),
    method: str = typer.Option("magnitude", "--method", help="--sparsity/--pattern scores: magnitude or wanda"),
    scope: str = typer.Option("row", "--scope", help="--sparsity compared per row, per layer, or global"),
    params: str = typer.Option(None, "--params", help="structured: target size, e.g. 90M (solves the MLP width)"),
    layers: int = typer.Option(None, "--layers", help="structured: layers to keep"),
    heads: int = typer.Option(None, "--heads", help="structured: query heads per layer to keep (whole KV groups)"),
    mlp: int = typer.Option(None, "--mlp", help="structured: MLP channels per layer to keep"),
    calib: str = typer.Option(None, "--calib", help="calibration text file (wanda and structured)"),
    calib_tokens: int = typer.Option(8192, "--calib-tokens", help="calibration tokens for activation statistics"),
    layer_tokens: int = typer.Option(1024, "--layer-tokens", help="calibration tokens for layer-removal losses"),
):
    """Prune a model: zero weights (magnitude, Wanda, 2:4) or remove layers/heads/channels for a smaller one."""
    from llmkit.compress.prune import run_prune

    check_output(out, "dir")
    if sparsity is not None:
        check_range("--sparsity", sparsity, 0, 1, high_open=True)
    s = run_prune(model, out, sparsity=sparsity, method=method, scope=scope, pattern=pattern, params=params,
                  layers=layers, heads=heads, mlp=mlp, calib=calib, calib_tokens=calib_tokens,
                  layer_tokens=layer_tokens, log=lambda line: print(line, file=sys.stderr))
    what = (f"{s['layers']} layers, {s['heads']} heads, MLP {s['mlp']}" if s["kind"] == "structured"
            else f"{s['sparsity']:.1%} of block weights zeroed ({s['method']})")
    print(f"{s['params_before']:,} -> {s['params_after']:,} parameters ({what}); saved to {out}")


def _prepare_pairs(inputs, out, tokenizer: str, vocab_size: int, val_fraction: float, seed: int) -> None:
    from llmkit.data.pairs import prepare_pairs, read_all_pairs
    from llmkit.tokenizer import Tokenizer

    texts = [text for pair in read_all_pairs(inputs) for text in pair]  # bad lines fail before training
    if tokenizer == "bpe":
        tok = Tokenizer.train_bpe(texts, vocab_size)
    elif tokenizer == "char":
        tok = Tokenizer.train_char(texts)
    else:
        tok = Tokenizer.load(tokenizer)
    meta = prepare_pairs(inputs, out, tok, val_fraction=val_fraction, seed=seed)
    print(f"{meta['pairs']['train']} train / {meta['pairs']['val']} val pairs ({meta['train_tokens']:,} train "
          f"tokens, vocab {meta['vocab_size']}) in {out}")


def _read_prompts(prompt_file: str) -> list[str]:
    try:
        with open(prompt_file, encoding="utf-8") as f:
            prompts = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise LlmkitError(f"cannot read prompt file {prompt_file}: {e}") from None
    if not prompts:
        raise LlmkitError(f"prompt file {prompt_file} has no prompts")
    return prompts


def _print_beams(net, tokenizer, prompts: list[str], params, beam: dict, echo: bool) -> None:
    """`generate --num-beams`: each prompt's best outputs, best first, separated by ---."""
    from llmkit.infer.generate import generate

    outputs = generate(net, tokenizer, prompts, params, **beam)
    first = True
    for p, texts in zip(prompts, outputs):
        for text in (texts if isinstance(texts, list) else [texts]):
            if not first:
                print("---")
            first = False
            print((p if echo else "") + text)


def _one_line(message: str) -> str:
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Run the command line; every user error ends as one `error: ...` line on stderr, exit status 1
    (2 for a malformed command line), never a traceback."""
    from typer._click import exceptions as click  # typer >= 0.26 raises its own vendored click's errors

    try:
        code = app(args=argv, standalone_mode=False)  # typer.Exit(code) comes back as its code
    except click.NoArgsIsHelpError as e:
        e.show()  # a bare `llmkit` or `llmkit train`-like call: the help is the answer
        sys.exit(2)
    except click.ClickException as e:  # typer/click usage errors would print a multi-line box
        where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        print(f"error: {_one_line(e.format_message())}{where}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except LlmkitError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
