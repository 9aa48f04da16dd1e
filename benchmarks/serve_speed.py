"""Serving throughput and latency: continuous batching against one request at a time.

Starts `llmkit serve` twice on loopback, as users run it: once as is (batching up to --max-batch
sequences) and once with --max-batch 1, then for 1, 4 and 16 concurrent streaming clients measures
aggregate generated tokens/s (all clients' tokens / wall time) and p50/p95 time to first token.
Every request asks for exactly --tokens tokens (ignore_eos), so both servers do the same work.

    .venv/bin/python benchmarks/serve_speed.py                      # SmolLM2-135M-Instruct
    .venv/bin/python benchmarks/serve_speed.py --model runs/tiny --clients 1 4 --tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain rain to a child.",
             "Name three prime numbers.", "Why is the sky blue?", "Give me a tip for learning Python."]


def start_server(model: str, port: int, max_batch: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "llmkit.cli", "serve", "--model", model, "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "256"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmkit serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("llmkit serve did not start")


def one_request(url: str, model: str, question: str, tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens received, total time) of one streaming chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
            "stream": True, "temperature": 0.7, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, received, usage = None, 0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                received += 1
                first = first or time.perf_counter() - start
    if usage != received:
        raise SystemExit(f"usage says {usage} tokens, the stream carried {received}")
    return first, received, time.perf_counter() - start


def run_level(url: str, model: str, clients: int, tokens: int) -> dict:
    results: list[tuple[float, int, float]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        result = one_request(url, model, QUESTIONS[i % len(QUESTIONS)], tokens)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {"clients": clients, "tokens": sum(r[1] for r in results), "seconds": wall,
            "tokens_per_s": sum(r[1] for r in results) / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the servers")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--modes", nargs="+", default=["batched", "one-at-a-time"], choices=["batched", "one-at-a-time"])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    served = Path(args.model).stem if Path(args.model).is_file() else Path(args.model).name
    # Both servers run side by side (an idle one costs no CPU) and each concurrency level is measured
    # on one right after the other, so a busy machine drifts less between the two numbers compared.
    servers = {}
    try:
        for i, (mode, max_batch) in enumerate((("batched", args.max_batch), ("one-at-a-time", 1))):
            if mode in args.modes:
                servers[mode] = (start_server(args.model, args.port + i, max_batch, args.threads),
                                 f"http://127.0.0.1:{args.port + i}")
                one_request(servers[mode][1], served, "warm up", 4)
        rows = []
        for clients in args.clients:
            for mode, (_, url) in servers.items():
                row = {"mode": mode, **run_level(url, served, clients, args.tokens)}
                rows.append(row)
                print(f"{mode:>14} {clients:>3} clients: {row['tokens_per_s']:7.1f} tok/s  TTFT p50 "
                      f"{row['ttft_p50']:6.2f} s  p95 {row['ttft_p95']:6.2f} s  ({row['seconds']:.1f} s)",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)

    base = {r["clients"]: r["tokens_per_s"] for r in rows if r["mode"] == "one-at-a-time"}
    print(f"\nmodel {args.model}, {args.tokens} tokens per request, {os.cpu_count()} CPUs\n")
    print("| server | clients | tokens/s | vs one-at-a-time | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        speedup = r["tokens_per_s"] / base[r["clients"]] if r["clients"] in base else float("nan")
        print(f"| {r['mode']} | {r['clients']} | {r['tokens_per_s']:.1f} | {speedup:.2f}x | "
              f"{r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
