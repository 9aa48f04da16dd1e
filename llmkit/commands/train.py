"""Commands that make models: demo, prepare, train, distill, finetune, prune, quantize."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

from llmkit.cli_help import DECODER_PRESETS, ENCODER_PRESETS, epilog
from llmkit.commands import app
from llmkit.errors import LlmkitError
from llmkit.utils import check_device, check_output, check_range



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
    elif config.objective == "heads":
        raise LlmkitError("objective 'heads' trains task heads: use `llmkit finetune DATA --task ...`")
    elif base_model is not None:
        raise LlmkitError("--model is for encoder objectives (contrastive); decoders start from --preset")
    else:
        trainer = Trainer(config, resume=resume)
    metrics = trainer.fit()
    if trainer.dist.is_main and "loss" in metrics:
        val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        print(f"step {metrics['step']}: loss {metrics['loss']:.4f}{val}; model saved to {config.out_dir}")


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


FINETUNE_TASKS = {"classify": "sequence classification, JSONL {text, label}",
                  "tag": "token classification (BIO tags), JSONL {tokens, tags}",
                  "intent-slots": "one encoder, an intent head and a slot (BIO) head trained jointly, "
                                  "JSONL {tokens, tags, label}",
                  "pair": "sentence-pair classification (paraphrase, entailment, relevance), "
                          "JSONL {text, text_pair, label}",
                  "qa": "extractive question answering (a span head), SQuAD-style JSONL {context, question, answers}",
                  "multi": "several of intent-slots, pair and qa on one encoder, trained jointly: DATA is a YAML "
                           "mixture file listing each part's task, train/val files and loss weight",
                  "sft": "chat fine-tuning of a decoder (full or --lora), JSONL {messages: [{role, content}, ...]}"}


# Over 60 lines only through its typer option list (one parameter per flag); the body is short.
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
    if task in ("intent-slots", "pair", "qa", "multi"):  # multi-task encoder recipes: named heads, one encoder
        from llmkit.train.joint import Part, read_mixture, train_parts
        from llmkit.train.tasks import FinetuneConfig

        if task == "multi" and val is not None:
            raise LlmkitError("--task multi takes each part's validation file from the mixture file, not --val")
        parts = read_mixture(data) if task == "multi" else [Part(task, data, val)]
        config = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, device=device)
        metrics = train_parts(model, parts, out, config, log=lambda line: print(line, file=sys.stderr))
        keys = {"intent-slots": ("intent_accuracy", "slot_f1"), "pair": ("accuracy", "macro_f1"),
                "qa": ("exact_match", "f1")}
        shown = "  ".join(f"{name} {metrics[name]:.4f}" for p in parts for k in keys[p.task]
                          for name in [k if len(parts) == 1 else f"{p.task}/{k}"] if name in metrics)
        print(f"{shown or 'no validation data'}; model saved to {out}")
        return
    raise LlmkitError(f"unknown --task {task!r}; choose from {', '.join(FINETUNE_TASKS)}")


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
