#!/usr/bin/env python3
"""llama.cpp's side of the LLM benchmark (tests/benches/llm.rs): the same GGUF through
llama-cpp-python's Llama class (tests/python/requirements-reference.txt), greedy chat
completions streamed with the model's chat template, `--threads` threads.

For K streams it runs K requests one after another (the Llama class serves one sequence at a
time), so its aggregate tokens/s is its single-stream rate. Prints one JSON line:
{"threads", "max_tokens", "streams": {K: {"tokens_per_s", "ttft_ms_p50", "tokens"}}}.
"""
import argparse
import json
import statistics
import time

from llama_cpp import Llama

QUESTIONS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle works, in detail.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter to a friend about your summer holiday.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", default="1,4,16")
    args = ap.parse_args()
    llm = Llama(model_path=args.gguf, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, seed=0)
    out = {"threads": args.threads, "max_tokens": args.max_tokens, "streams": {}}
    # Warm up.
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    for k in [int(x) for x in args.streams.split(",")]:
        ttfts, tokens = [], 0
        start = time.perf_counter()
        for i in range(k):
            q = QUESTIONS[i % len(QUESTIONS)]
            t0 = time.perf_counter()
            first = None
            for chunk in llm.create_chat_completion(
                messages=[{"role": "user", "content": q}], max_tokens=args.max_tokens, temperature=0, stream=True
            ):
                delta = chunk["choices"][0].get("delta", {})
                if delta.get("content"):
                    if first is None:
                        first = time.perf_counter() - t0
                    tokens += 1
            ttfts.append((first or 0) * 1000)
        wall = time.perf_counter() - start
        out["streams"][str(k)] = {"tokens_per_s": tokens / wall, "ttft_ms_p50": statistics.median(ttfts), "tokens": tokens}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
