"""Load with structured outputs: 16 streaming clients for 30 s, then the same with half of them asking for
a JSON schema (response_format json_schema). Prints both runs' aggregate tokens/s, their ratio, errors, and
how many structured replies parsed and validated (jsonschema): every one of them, also those that ran into
max_tokens (the engine closes their JSON in time; they end with finish_reason "length"). One `llmkit serve`
on loopback, as users run it.

    python benchmarks/serve_structured_load.py [--model smollm2-135m-instruct] [--clients 16] [--seconds 30]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_isas, cpu_name  # noqa: E402
from serve_speed import QUESTIONS, start_server  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 80}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    "topics": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3}},
    "required": ["answer", "confidence", "topics"], "additionalProperties": False}


def one_request(url, model, question, tokens, structured):
    body = {"model": model, "messages": [{"role": "user", "content": question + " Answer in JSON."}],
            "max_tokens": tokens, "stream": True, "temperature": 0.7, "stream_options": {"include_usage": True}}
    if structured:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    text, count, finish = [], 0, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for c in chunk["choices"]:
                count += 1
                text.append(c["delta"].get("content") or "")
                finish = c["finish_reason"] or finish
    return count, "".join(text), finish


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError) as e:
        print(f"invalid structured reply ({e.__class__.__name__}): {text!r}", file=sys.stderr)
        return False


def run(url, model, clients, seconds, tokens, structured_share):
    stats = {"tokens": 0, "requests": 0, "errors": 0, "structured": 0, "valid": 0, "truncated": 0}
    lock, stop_at = threading.Lock(), time.perf_counter() + seconds

    def client(i):
        structured = i < clients * structured_share
        n = 0
        while time.perf_counter() < stop_at:
            try:
                count, text, finish = one_request(url, model, QUESTIONS[(i + n) % len(QUESTIONS)], tokens, structured)
                ok = structured and valid(text)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    stats["errors"] += 1
                print(f"client {i}: {e}", file=sys.stderr)
                continue
            with lock:
                stats["tokens"] += count
                stats["requests"] += 1
                stats["structured"] += structured
                stats["valid"] += ok
                stats["truncated"] += structured and finish == "length"
            n += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    stats["tokens_per_s"] = stats["tokens"] / (time.perf_counter() - start)
    return stats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8741)
    args = ap.parse_args()
    served = Path(args.model).stem if Path(args.model).is_file() else Path(args.model).name
    proc = start_server(args.model, args.port, args.clients, None)
    url = f"http://127.0.0.1:{args.port}"
    try:
        one_request(url, served, "warm up", 8, True)  # builds the grammar tables once
        run(url, served, args.clients, 5, args.tokens, 0.5)  # and a few seconds of load: the KV cache's growth
        free = run(url, served, args.clients, args.seconds, args.tokens, 0.0)
        mixed = run(url, served, args.clients, args.seconds, args.tokens, 0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"\n{cpu_name()}; {' '.join(cpu_isas())}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
          f"model {args.model}; {args.clients} clients x {args.seconds:g} s")
    print("| run | requests | errors | tokens/s | structured replies | valid | of them closed at max_tokens |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, s in (("no schema", free), ("half with a JSON schema", mixed)):
        print(f"| {name} | {s['requests']} | {s['errors']} | {s['tokens_per_s']:.1f} | {s['structured']} | "
              f"{s['valid']} | {s['truncated']} |")
    print(f"\nthroughput with schemas / without: {mixed['tokens_per_s'] / free['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
