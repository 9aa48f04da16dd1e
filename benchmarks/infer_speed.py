"""Inference speed: SmolLM2-135M-Instruct, batch 1, llmkit vs transformers on the same weights.

    .venv/bin/python benchmarks/infer_speed.py [--prompt-tokens 512] [--new-tokens 128] [--dtypes fp32,bf16]
                                               [--engines matmul-floor,llmkit,llmkit-pytorch,llmkit-compiled,transformers]
                                               [--repeats 2] [--threads N] [--rounds 1]

The embedded GGUF is dequantized once and written as a Hugging Face directory, so both engines load
exactly the same float weights. Every (engine, dtype) row runs in its own child process, so the
peak resident memory (ru_maxrss) it reports is that engine's alone. Per row:
  prefill  tokens/s of one forward over the ~512-token chat prompt (fresh KV cache, best of --repeats)
  decode   tokens/s of 128 greedy tokens after that prefill (one token per step with the KV cache,
           argmax on the host each step, as a chat loop does; best of --repeats). "CPU-time tok/s"
           divides by this process's CPU seconds instead of wall seconds: with --threads 1 it is
           what an idle core would give, even while other jobs share the machine; the "vs
           transformers" ratio then uses it (with more threads it uses wall time).
Engines:
  matmul-floor     not a model: one batch-1 F.linear per weight matrix, i.e. all weights streamed once
                   by PyTorch's own matrix-vector kernels (in the faster of row- and column-major
                   layout): what a model built on PyTorch's matmuls cannot beat
  llmkit           llmkit.model GPT with llmkit.infer.cpu's swaps, eager, through llmkit.infer.generate.Decoder
                   as `llmkit generate` and `llmkit chat` run it: one-row products, decode attention
                   and RMSNorm through llmkit.infer.kernels (which stream the weights faster than the floor)
  llmkit-pytorch   the same with llmkit.infer.kernels switched off (LLMKIT_KERNELS=0): PyTorch's ops only,
                   fp32 weights column-major (llmkit.infer.cpu.decode_layout)
  llmkit-compiled  Decoder(compile=True) (static KV cache, compiled block; "warm-up s" includes
                   compiling it)
  transformers     LlamaForCausalLM with its DynamicCache (the path model.generate() takes); the
                   reference of the float rows ("vs reference"), as llama.cpp is of the quantized rows
Quantized rows (--quant q4_1,q8_0; one per format and engine, on one GGUF file each: q4_1 is the
embedded file as shipped, q8_0 its dequantized weights written by `llmkit convert --to gguf --type q8_0`):
  llmkit           the GGUF's blocks used in place (llmkit.infer.quant), as `llmkit generate` loads it;
                   "load s" is load + the first token of a one-word prompt (the kernels already built)
  llama.cpp        llama-cpp-python on the same file with the same threads, when `llama_cpp` is
                   importable: `CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
                   pip install llama-cpp-python==0.3.36` (a ~10-minute source build; on CPUs with AMX add
                   -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF: the default
                   build crashes in decode there). A benchmark dependency only.
The header names the CPU and the instruction sets llmkit's quantized kernels use.
Reference numbers for this machine class (2 cores): transformers 5.23 decodes ~17.9 tok/s (fp32) and
~25 (bf16), prefills ~614 / ~1,135 tok/s; llama.cpp (Q4_1) decodes ~139 tok/s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from machine import cpu_name  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHAKESPEARE = REPO.parent / "shared/data/tinyshakespeare.txt"


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    """A chat prompt of about n_tokens: a passage to summarise, through the model's template."""
    source = SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.exists() else \
        "The quick brown fox jumps over the lazy dog while the cat watches from the window. " * 200
    words, text = source.split(), ""
    for i in range(0, len(words), 5):
        text = " ".join(words[:i + 5])
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": f"Summarise:\n{text}"}])
        ids = tokenizer.encode(rendered)
        if len(ids) >= n_tokens:
            return ids
    return ids


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call of fn."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_llmkit(model_dir, dtype, ids, new_tokens, repeats, compiled):
    from llmkit.io.hf import load_hf

    from llmkit.infer.generate import Decoder
    from llmkit.infer.cpu import optimize_for_inference

    model, _ = load_hf(model_dir)
    # as `llmkit generate` and `llmkit chat` do
    model = optimize_for_inference(model.to(dtype).eval(), single_row=True)
    decoder = Decoder(model, 1, len(ids) + new_tokens, compile=compiled)
    with torch.inference_mode():
        return measure(*decoder_runs(decoder, ids, new_tokens), repeats)


def decoder_runs(decoder, ids, new_tokens):
    """(prefill, decode) for measure(): the prompt into the decoder's one cache, started over each time
    (one cache, as one `llmkit generate` holds; a compiled graph keeps its buffers), then greedy steps."""
    def prefill():
        decoder.cache.reset()
        return decoder.prefill([ids]), decoder

    def decode(logits, decoder):
        out = []
        tok = logits.argmax(-1)
        for _ in range(new_tokens):
            out.append(int(tok))
            tok = decoder.step(tok).argmax(-1)
        return out

    return prefill, decode


def run_floor(model_dir, dtype, repeats):
    """Time of the per-token matmuls alone: every weight matrix times one activation vector, i.e.
    streaming all weights from memory once, with no norms, attention or framework in between."""
    import torch.nn.functional as F

    from llmkit.io.hf import load_hf

    model, _ = load_hf(model_dir)
    weights = [m.weight.to(dtype) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in weights}
    times = []
    with torch.inference_mode():
        # both memory layouts (row-major as loaded, column-major as llmkit.infer.cpu.decode_layout): the faster counts
        for layout in (weights, [w.t().contiguous().t() for w in weights]):
            times += [timed(lambda: [F.linear(inputs[w.shape[1]], w) for w in layout]) for _ in range(repeats + 2)]
    return min(t[0] for t in times), min(t[1] for t in times)


def run_transformers(model_dir, dtype, ids, new_tokens, repeats):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    x = torch.tensor([ids])

    def prefill():
        cache = transformers.DynamicCache(config=model.config)
        out = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def decode(logits, cache):
        out = []
        tok = logits.argmax(-1, keepdim=True)
        for _ in range(new_tokens):
            out.append(int(tok))
            res = model(tok, past_key_values=cache, use_cache=True)
            cache, tok = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
        return out

    with torch.inference_mode():
        return measure(prefill, decode, repeats)


def run_llmkit_quantized(gguf_path, ids, new_tokens, repeats):
    """llmkit on the GGUF's own blocks, through the Decoder `llmkit generate` uses; also (load + first
    token) seconds."""
    from llmkit.infer import quant
    from llmkit.infer.cpu import optimize_for_inference
    from llmkit.infer.generate import Decoder
    from llmkit.io.resolve import resolve_model

    quant.available()  # built (and cached) before the clock starts, as after a first run
    start = time.perf_counter()
    model, tokenizer = resolve_model(gguf_path, dtype="quantized")
    optimize_for_inference(model, single_row=True)  # as `llmkit generate` runs it
    with torch.inference_mode():
        model(torch.tensor([tokenizer.encode("Hello")]), last_only=True)[0].argmax()
    load = time.perf_counter() - start
    decoder = Decoder(model, 1, len(ids) + new_tokens)  # one cache for every repeat: peak RSS counts it once
    with torch.inference_mode():
        return (*measure(*decoder_runs(decoder, ids, new_tokens), repeats), load)


def run_llama_cpp(gguf_path, ids, new_tokens, repeats, threads):
    """llama-cpp-python on the same file: eval of the prompt, then one eval per greedy token."""
    import llama_cpp
    import numpy as np

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(ids) + new_tokens + 8, n_batch=len(ids),
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(llm.tokenize(b"Hello", add_bos=False))
    load = time.perf_counter() - start

    def last_logits():
        # llm.scores holds logits only with logits_all=True (which computes them for every prompt token)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))

    def prefill():
        llm.reset()
        llm.eval(ids)
        return last_logits().copy(), None

    def decode(logits, _):
        out, tok = [], int(np.argmax(logits))
        for _ in range(new_tokens):
            out.append(tok)
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        return out
    return (*measure(prefill, decode, repeats), load)


def measure(prefill, decode, repeats):
    """Best (wall, CPU) seconds of prefill and of decode over `repeats` runs after a warm-up."""
    warmup = timed(lambda: decode(*prefill()))[0]  # includes compilation, for the compiled engine
    best = {"prefill": (float("inf"),) * 2, "decode": (float("inf"),) * 2}
    tokens = None
    for _ in range(repeats):
        state = None

        def run_prefill():
            nonlocal state
            state = prefill()

        def run_decode():
            nonlocal tokens
            tokens = decode(*state)
        for name, fn in (("prefill", run_prefill), ("decode", run_decode)):
            best[name] = tuple(map(min, best[name], timed(fn)))
    return best["prefill"], best["decode"], tokens, warmup


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss across fork + exec, so a child would report its parent's peak (1.5 GB here) as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    """One (engine, dtype) row; prints one JSON line."""
    from llmkit.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    dtype = DTYPES.get(args.dtype)  # None for the quantized rows (args.gguf)
    ids = prompt_ids(Tokenizer.load(Path(args.model_dir) / "tokenizer.json"), args.prompt_tokens)
    nan = (float("nan"),) * 2
    load = float("nan")
    if args.gguf:
        run = run_llama_cpp if args.engine == "llama.cpp" else run_llmkit_quantized
        extra = (args.threads,) if args.engine == "llama.cpp" else ()
        prefill, decode, tokens, warmup, load = run(args.gguf, ids, args.new_tokens, args.repeats, *extra)
        n_new = args.new_tokens
    elif args.engine == "matmul-floor":
        step = run_floor(args.model_dir, dtype, args.repeats)
        prefill, decode, tokens, warmup, n_new = nan, step, None, 0.0, 1
    elif args.engine == "transformers":
        prefill, decode, tokens, warmup = run_transformers(args.model_dir, dtype, ids, args.new_tokens, args.repeats)
        n_new = args.new_tokens
    else:
        if args.engine == "llmkit-pytorch":
            os.environ["LLMKIT_KERNELS"] = "0"
        prefill, decode, tokens, warmup = run_llmkit(args.model_dir, dtype, ids, args.new_tokens, args.repeats,
                                                     compiled=args.engine == "llmkit-compiled")
        n_new = args.new_tokens
    print(json.dumps({"engine": args.engine, "dtype": args.dtype, "prompt": len(ids),
                      "prefill_tok_s": len(ids) / prefill[0], "decode_tok_s": n_new / decode[0],
                      "decode_cpu_tok_s": n_new / decode[1],
                      "peak_rss_mb": peak_rss_mb(),
                      "warmup_s": warmup, "load_s": load, "tokens": tokens}))


def print_row(r: dict, reference: dict | None, key: str) -> None:
    ratio = f"{r[key] / reference[key]:.2f}x" if reference else "-"
    same = "" if not reference or r["tokens"] in (None, reference["tokens"]) else "  (greedy tokens differ)"
    prompt = r["prompt"] if r["tokens"] is not None else "-"
    load = "" if r.get("load_s") != r.get("load_s") or r.get("load_s") is None else f"  load+first token {r['load_s']:.2f} s"
    print(f"{r['engine']:<16} {r['dtype']:<5} {prompt:>6} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
          f"{r['decode_cpu_tok_s']:>15.1f} {ratio:>16} {r['peak_rss_mb']:>12.0f} {r['warmup_s']:>10.1f}{same}{load}",
          flush=True)




def quant_isa() -> str:
    from llmkit.infer import quant
    return f"{quant.isa_name()} (this CPU: {', '.join(quant.supported_isas()) or 'none'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--engines", default="matmul-floor,llmkit,llmkit-pytorch,llmkit-compiled,transformers")
    parser.add_argument("--quant", default="q4_1,q8_0", help="GGUF formats for the quantized rows ('' for none)")
    parser.add_argument("--quant-engines", default="llmkit,llama.cpp")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="quantized rows: run llama.cpp and llmkit alternately this many times (a shared "
                             "machine's speed drifts by tens of percent within minutes)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads per engine; 1 makes CPU-time tok/s robust to a busy machine")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from llmkit.io.hf import save_hf
    from llmkit.io.resolve import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = resolve_model("smollm2-135m-instruct", dtype="float32")
        save_hf(model, tokenizer, tmp)   # the dequantized weights, shared by every row
        del model
        print(f"{cpu_name()}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), llmkit "
              f"quantized kernels: {quant_isa()}; {args.threads} threads; SmolLM2-135M-Instruct (float rows: "
              f"the Q4_1 GGUF dequantized), batch 1, {args.new_tokens} greedy tokens", flush=True)
        header = f"{'engine':<16} {'dtype':<5} {'prompt':>6} {'prefill tok/s':>14} {'decode tok/s':>13} " \
                 f"{'CPU-time tok/s':>15} {'vs reference':>16} {'peak RSS MB':>12} {'warm-up s':>10}"
        # one thread: compare CPU time, which a busy machine hardly changes; more: wall time (quiet machine)
        key = "decode_cpu_tok_s" if args.threads == 1 else "decode_tok_s"
        print(header + "\n" + "-" * len(header), flush=True)
        # transformers first, so every other row can be compared with it as soon as it is done
        engines = sorted(args.engines.split(","), key=lambda e: e != "transformers")
        for dtype in filter(None, args.dtypes.split(",")):
            reference = None
            for engine in engines:
                row = run_child(args, engine, dtype, tmp)
                reference = row if engine == "transformers" else reference
                if row:
                    print_row(row, reference, key)
        quantized_rows(args, tmp, key)


def run_child(args, engine: str, dtype: str, model_dir: str, gguf=None) -> dict | None:
    """One row in its own process; None (and a line saying why) when it fails."""
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--dtype", dtype, "--model-dir", model_dir,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads), *(["--gguf", str(gguf)] if gguf else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{engine:<16} {dtype:<5} failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def quantized_rows(args, tmp: str, key: str) -> None:
    """llmkit and llama.cpp on the same GGUF file per format, side by side (llama.cpp is the reference)."""
    import importlib.util

    from llmkit.io.resolve import convert, embedded_model_path

    formats = [f for f in args.quant.split(",") if f]
    if not formats:
        return
    engines = [e for e in args.quant_engines.split(",") if e != "llama.cpp" or importlib.util.find_spec("llama_cpp")]
    if "llama.cpp" in args.quant_engines.split(",") and "llama.cpp" not in engines:
        print("(no llama.cpp row: llama_cpp is not importable; see the docstring to install it)", flush=True)
    for fmt in formats:
        path = embedded_model_path("smollm2-135m-instruct")
        if fmt != "q4_1":  # the same weights in another format: quantized from the float copy (converting the
            # GGUF itself would keep its Q4_1 blocks as they are)
            path = convert(tmp, Path(tmp) / f"smollm2-{fmt}.gguf", to="gguf", gguf_type=fmt)
        ratios = []
        for _ in range(args.rounds):
            reference = None
            for engine in sorted(engines, key=lambda e: e != "llama.cpp"):
                row = run_child(args, engine, fmt, tmp, gguf=path)
                reference = row if engine == "llama.cpp" else reference
                if row:
                    print_row(row, reference, key)
                    if reference and row is not reference:
                        ratios.append(row[key] / reference[key])
        if len(ratios) > 1:
            print(f"{fmt}: llmkit decode / llama.cpp decode per round: {', '.join(f'{r:.2f}x' for r in ratios)} "
                  f"(median {sorted(ratios)[len(ratios) // 2]:.2f}x)", flush=True)

if __name__ == "__main__":
    main()
