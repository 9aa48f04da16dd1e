"""The `llmkit` command: one sub-command per verb, each a thin wrapper over the library."""
from __future__ import annotations

import sys

import typer

from llmkit.errors import LlmkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="llmkit: from raw text to a served chat model.")


@app.command(context_settings={"allow_interspersed_args": True})
def train(
    args: list[str] = typer.Argument(None, metavar="[CONFIG.yaml] [KEY=VALUE]...",
                                     help="optional YAML config, then overrides like lr=3e-4 model.n_layer=6"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint in out_dir"),
    data: str = typer.Option(None, "--data", help="prepared data dir (data_dir=...)"),
    out: str = typer.Option(None, "--out", help="output model dir (out_dir=...)"),
    preset: str = typer.Option(None, "--preset", help="model preset name"),
    max_steps: int = typer.Option(None, "--max-steps", help="optimizer steps to train for"),
):
    """Train a model on a prepared data dir (single process, or under torchrun for DDP)."""
    from llmkit.train import Trainer, load_train_config

    args = list(args or [])
    config_file = args.pop(0) if args and "=" not in args[0] else None
    config = load_train_config(config_file, args, data_dir=data, out_dir=out, preset=preset, max_steps=max_steps)
    trainer = Trainer(config, resume=resume)
    metrics = trainer.fit()
    if trainer.dist.is_main and "loss" in metrics:
        val = f", val loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else ""
        print(f"step {metrics['step']}: loss {metrics['loss']:.4f}{val}; model saved to {config.out_dir}")


@app.command("eval")
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
):
    """Mean loss (nats/token) and perplexity of a model on text or a data split."""
    import json

    from llmkit.evaluate import evaluate_model

    result = evaluate_model(model, text_file=text, data_dir=data, split=split, batch_size=batch_size,
                            stride=stride, max_tokens=max_tokens, device=device)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"{result['source']}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"({result['tokens']} tokens)")


@app.command("serve")
def serve_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model",
                              help="decoder (llmkit/HF dir, .gguf, short name) or an encoder for embeddings"),
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
):
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/."""
    from llmkit.serve import serve

    serve(model, host=host, port=port, embedding_model=embedding_model, api_key=api_key, max_batch=max_batch,
          max_queue=max_queue, context=context, timeout=timeout, max_body_bytes=max_body)


@app.command("prepare")
def prepare_cmd(
    inputs: list[str] = typer.Argument(..., help=".txt / .jsonl files or directories of them"),
    out: str = typer.Option(..., "--out", help="output data directory"),
    tokenizer: str = typer.Option("bpe", "--tokenizer", help="bpe, char, or a tokenizer.json to reuse"),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="vocabulary size when training bpe"),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="share of documents (or tail tokens) for val"),
    seed: int = typer.Option(0, "--seed", help="seed of the train/val document split"),
):
    """Tokenize text into train.bin / val.bin (+ meta.json, tokenizer.json) for `llmkit train`."""
    from llmkit.data import iter_texts, prepare
    from llmkit.tokenizer import Tokenizer

    if tokenizer == "bpe":
        tok = Tokenizer.train_bpe(iter_texts(inputs), vocab_size)
    elif tokenizer == "char":
        tok = Tokenizer.train_char(iter_texts(inputs))
    else:
        tok = Tokenizer.load(tokenizer)
    meta = prepare(inputs, out, tok, val_fraction=val_fraction, seed=seed)
    print(f"{meta['documents']} documents -> {meta['train_tokens']:,} train / {meta['val_tokens']:,} val "
          f"tokens ({meta['dtype']}, vocab {meta['vocab_size']}) in {out}")


@app.command("serve")
def serve_cmd(
    model: str = typer.Option("smollm2-135m-instruct", "--model",
                              help="decoder (llmkit/HF dir, .gguf, short name) or an encoder for embeddings"),
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
):
    """Serve a model over an OpenAI-compatible HTTP API, with a chat page at http://HOST:PORT/."""
    from llmkit.serve import serve

    serve(model, host=host, port=port, embedding_model=embedding_model, api_key=api_key, max_batch=max_batch,
          max_queue=max_queue, context=context, timeout=timeout, max_body_bytes=max_body)


def main() -> None:
    try:
        app()
    except LlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
