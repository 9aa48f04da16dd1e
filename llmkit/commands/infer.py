"""Commands that run models: generate, chat, serve, embed, predict, dialog, index, ask."""
from __future__ import annotations

import sys

import typer

from llmkit.cli_help import epilog
from llmkit.commands import app
from llmkit.errors import LlmkitError
from llmkit.utils import check_device, check_output, check_range



# Over 60 lines only through its typer option list (one parameter per flag); the body is short.
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
    dtype: str = typer.Option(None, "--dtype", help="default: as stored (a GGUF's q8_0/q4_0/q4_1 blocks kept "
                                                    "on the CPU, other models float32); float32, bfloat16 or "
                                                    "float16 expand every weight; quantized insists on blocks"),
    echo: bool = typer.Option(True, "--echo/--no-echo", help="print each prompt before its completion"),
    num_beams: int = typer.Option(1, "--num-beams", help="beam search with this many beams (deterministic)"),
    length_penalty: float = typer.Option(1.0, "--length-penalty", help="beams: >0 favours longer outputs"),
    early_stopping: str = typer.Option("false", "--early-stopping", help="beams: true, false or never"),
    no_repeat_ngram_size: int = typer.Option(0, "--no-repeat-ngram-size", help="beams: forbid repeated n-grams"),
    num_return_sequences: int = typer.Option(1, "--num-return-sequences", help="beams: best N outputs per prompt"),
    json_schema: str = typer.Option(None, "--json-schema", help="JSON schema file: the output is JSON following it"),
):
    """Continue a prompt, streaming tokens to stdout; --prompt-file runs a batch and prints each completion."""
    from llmkit.infer.sampling import SamplingParams
    from llmkit.infer.generate import generate, stream
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
    dtype: str = typer.Option(None, "--dtype", help="default: as stored (a GGUF's q8_0/q4_0/q4_1 blocks kept "
                                                    "on the CPU, other models float32); float32, bfloat16 or "
                                                    "float16 expand every weight; quantized insists on blocks"),
):
    """Chat with a model: streamed replies, multi-turn history, /reset and /exit."""
    from llmkit.infer.chat import ChatSession, chat_loop
    from llmkit.infer.sampling import SamplingParams
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.io.resolve import resolve_model

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed)
    net, tokenizer = resolve_model(model, device=check_device(device), dtype=dtype)
    chat_loop(ChatSession(optimize_for_inference(net, single_row=True), tokenizer, system=system, params=params))


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
    dtype: str = typer.Option(None, "--dtype", help="decoder weights: as stored (default: a GGUF's blocks "
                                                           "kept), float32, bfloat16, float16 or quantized"),
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
    from llmkit.infer.embed import embed_texts, inference_encoder, jsonl_lines, write_embeddings
    from llmkit.io.encoders import read_lines

    if out is not None and not out.endswith((".jsonl", ".npy")):
        raise LlmkitError(f"--out {out} must end in .jsonl or .npy")
    if out is not None:
        check_output(out, "file")
    check_range("--batch-size", batch_size, 1, integer=True)
    device = check_device(device)
    texts = read_lines(input_file)
    net, tokenizer = inference_encoder(model, device)
    vectors = embed_texts(net, tokenizer, texts, batch_size=batch_size)
    if out is None:
        sys.stdout.writelines(jsonl_lines(texts, vectors))
    else:
        write_embeddings(out, vectors, texts)
        print(f"wrote {len(texts)} embeddings of dimension {vectors.shape[1]} to {out}", file=sys.stderr)


@app.command("predict", epilog=epilog("predict"))
def predict_cmd(
    input_file: str = typer.Argument(..., metavar="FILE",
                                     help="JSONL ({text}, {tokens} or {text, text_pair}; gold label/tags "
                                          "optional) or .txt lines (pairs: text<TAB>text_pair)"),
    model: str = typer.Option(..., "--model", help="a model fine-tuned with `llmkit finetune --task "
                                                   "classify|tag|intent-slots|pair`"),
    out: str = typer.Option(None, "--out", "-o", help="output JSONL (default: stdout)"),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: str = typer.Option("cpu", "--device"),
):
    """Predict a label per text (classify) or pair (pair), tags per word (tag), or both (intent-slots); scores
    the predictions when gold is given."""
    from llmkit.train.multitask import is_joint
    from llmkit.train.tasks import format_metrics, run_predict

    if out is not None:
        check_output(out, "file")
    check_range("--batch-size", batch_size, 1, integer=True)
    device = check_device(device)
    if is_joint(model):
        _predict_multi(model, input_file, out, batch_size, device)
        return
    metrics = run_predict(model, input_file, out, batch_size=batch_size, device=device)
    if metrics is not None:
        print(f"{metrics['examples']} labelled examples: {format_metrics(metrics)}", file=sys.stderr)


@app.command("dialog", epilog=epilog("dialog"))
def dialog_cmd(
    domain: str = typer.Argument(..., help="domain YAML: intents, slots, required slots, prompts, actions"),
    nlu: list[str] = typer.Option(..., "--nlu", help="an intent-slots model (or a classify and a tag model)"),
    reply: str = typer.Option(None, "--reply", help="template, or chat: the chat model words each reply "
                                                    "(default: the domain file's `reply`, else template)"),
    chat_model: str = typer.Option("smollm2-135m-instruct", "--chat-model", help="--reply chat: the chat model"),
    actions: str = typer.Option(None, "--actions", help="append each executed action to this JSONL file"),
    show_state: bool = typer.Option(False, "--show-state", help="print the NLU result and state after each turn"),
):
    """Talk to a task-oriented dialogue system in the terminal (NLU -> state tracking -> policy -> reply)."""
    from llmkit.apps.dialog import ChatReplier, Dialog, dialog_loop
    from llmkit.apps.domain import load_domain
    from llmkit.apps.nlu import NLU

    if reply not in (None, "template", "chat"):
        raise LlmkitError(f"--reply must be template or chat, got {reply!r}")
    if actions is not None:
        check_output(actions, "file", "--actions")
    session = Dialog(load_domain(domain), NLU.load(*nlu))
    reply = reply or session.domain.reply
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
    from llmkit.infer.embed import inference_encoder

    check_output(out, "dir")
    check_range("--chunk-words", chunk_words, 1, integer=True)
    check_range("--overlap", overlap, 0, chunk_words - 1, integer=True)
    check_range("--batch-size", batch_size, 1, integer=True)
    documents = read_documents(docs)
    net, tokenizer = inference_encoder(model)  # the engine `embed` runs
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
    import time

    from llmkit.apps.retrieval import Index, answer_prompt, read_questions, recall_at_k
    from llmkit.infer.embed import embed_texts, inference_encoder, single_thread

    if (question is None) == (evaluate is None) or k < 1:
        raise LlmkitError("give a QUESTION or --eval QUESTIONS.jsonl (not both), and -k >= 1")
    idx = Index(index)
    name = model or idx.meta["model"]
    net, tokenizer = inference_encoder(name)
    idx.check_model(net, name)
    if evaluate:
        print(json.dumps(recall_at_k(idx, net, tokenizer, read_questions(evaluate))))
        return
    started = time.perf_counter()
    with single_thread():
        hits = idx.search(embed_texts(net, tokenizer, [question]), k)[0]
    took = time.perf_counter() - started  # the retrieval: embedding the question + the search
    print(f"retrieved {len(hits)} of {len(idx.chunks):,} chunks in {took * 1e3:.1f} ms", file=sys.stderr)
    sources = [f"[{n}] {h.doc} #{h.chunk} (score {h.score:.3f})" for n, h in enumerate(hits, 1)]
    if retrieve_only:
        for line, h in zip(sources, hits):
            print(f"{line}\n    {h.text[:300]}")
        return
    from llmkit.infer.chat import ask

    ask(answer_prompt(question, hits), model=chat_model, out=sys.stdout, max_new_tokens=max_new_tokens)
    print("sources:\n  " + "\n  ".join(sources))


def _predict_multi(model_path: str, input_file: str, out: str | None, batch_size: int, device: str) -> None:
    """`predict` with a multi-task model: the label of each pair (a pair head), or intent, tags and slot
    values per line (a joint intent-slots model)."""
    from llmkit.io.encoders import load_encoder
    from llmkit.train.multitask import run_predict_joint
    from llmkit.train.pair import has_pair_head, run_predict_pairs
    from llmkit.train.tasks import format_metrics
    from llmkit.utils import atomic_open

    net, tokenizer = load_encoder(model_path, device)
    if has_pair_head(net):
        lines, metrics = run_predict_pairs(net, tokenizer, input_file, batch_size)
        shown = metrics and format_metrics(metrics)
    else:
        lines, metrics = run_predict_joint(net, tokenizer, input_file)
        shown = metrics and (f"intent_accuracy {metrics['intent_accuracy']:.4f}  "
                             f"slot_f1 {metrics['slot_f1']:.4f}")
    if out is None:
        sys.stdout.writelines(lines)
    else:
        with atomic_open(out, encoding="utf-8") as f:
            f.writelines(lines)
    if metrics is not None:
        print(f"{metrics['examples']} labelled examples: {shown}", file=sys.stderr)


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
