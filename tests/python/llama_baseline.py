#!/usr/bin/env python3
"""llama.cpp's side of the LLM benchmark (tests/benches/llm.rs): the same GGUF through
llama-cpp-python's low-level API (tests/python/requirements-reference.txt), `--threads`
threads, greedy, the model's chat template.

K streams run as llama.cpp's server runs K slots: one context with K sequences, the K prompts
prefilled in one batch, then every step decodes one token of every unfinished sequence in one
`llama_decode` (the batched API), not K requests one after another. `--rounds` runs each
stream count that many times and keeps the median rate. Prints one JSON line:
{"threads", "max_tokens", "cpu_features", "streams": {K: {"tokens_per_s", "ttft_ms_p50",
"tokens"}}}; `cpu_features` is what llama.cpp's CPU backend was built with and uses.
"""
import argparse
import ctypes
import json
import statistics
import time

import jinja2
import llama_cpp
import numpy as np

QUESTIONS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain how a bicycle works, in detail.",
    "Describe a day in the life of a lighthouse keeper.",
    "Write a letter to a friend about your summer holiday.",
]


def prompt_tokens(vocab_model, template, question):
    text = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )
    return vocab_model.tokenize(text.encode(), add_bos=False, special=True)


def run(model, vocab, n_vocab, eos, threads, prompts, max_tokens):
    """Generates for every prompt at once; returns (tokens, ttft seconds per stream, wall)."""
    k = len(prompts)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 2048 * k
    params.n_batch = max(512, sum(len(p) for p in prompts))
    params.n_ubatch = params.n_batch
    params.n_seq_max = k
    params.n_threads = threads
    params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, k)

    def decode(entries):
        """entries: (token, position, sequence, wants logits); returns the logits rows."""
        batch.n_tokens = len(entries)
        rows = []
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
            if logits:
                rows.append(i)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i in rows:
            ptr = llama_cpp.llama_get_logits_ith(ctx, i)
            out.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)))
        return out

    start = time.perf_counter()
    entries = []
    for s, p in enumerate(prompts):
        entries += [(t, i, s, i == len(p) - 1) for i, t in enumerate(p)]
    nexts = [int(np.argmax(row)) for row in decode(entries)]
    ttft = [time.perf_counter() - start] * k
    positions = [len(p) for p in prompts]
    produced = [0] * k
    live = [s for s in range(k) if nexts[s] not in eos]
    for s in range(k):
        produced[s] = int(nexts[s] not in eos)
    while live:
        live = [s for s in live if produced[s] < max_tokens]
        if not live:
            break
        rows = decode([(nexts[s], positions[s], s, True) for s in live])
        for s, row in zip(live, rows):
            positions[s] += 1
            nexts[s] = int(np.argmax(row))
        live = [s for s in live if nexts[s] not in eos]
        for s in live:
            produced[s] += 1
    wall = time.perf_counter() - start
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    return sum(produced), ttft, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per stream count; the median rate is kept")
    args = ap.parse_args()
    llama_cpp.llama_backend_init()
    vocab_model = llama_cpp.Llama(model_path=args.gguf, vocab_only=True, verbose=False)
    template = vocab_model.metadata["tokenizer.chat_template"]
    model = llama_cpp.llama_model_load_from_file(args.gguf.encode(), llama_cpp.llama_model_default_params())
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eos = {vocab_model.token_eos()}
    for name in (b"<|im_end|>", b"<|endoftext|>"):
        ids = vocab_model.tokenize(name, add_bos=False, special=True)
        if len(ids) == 1:
            eos.add(ids[0])
    features = llama_cpp.llama_print_system_info().decode()
    out = {"threads": args.threads, "max_tokens": args.max_tokens, "cpu_features": features, "streams": {}}
    # Warm up.
    run(model, vocab, n_vocab, eos, args.threads, [prompt_tokens(vocab_model, template, "Hi")], 4)
    for k in [int(x) for x in args.streams.split(",")]:
        prompts = [prompt_tokens(vocab_model, template, QUESTIONS[i % len(QUESTIONS)]) for i in range(k)]
        rates, ttfts = [], []
        for _ in range(max(1, args.rounds)):
            tokens, ttft, wall = run(model, vocab, n_vocab, eos, args.threads, prompts, args.max_tokens)
            rates.append(tokens / wall)
            ttfts += ttft
        out["streams"][str(k)] = {
            "tokens_per_s": statistics.median(rates),
            "ttft_ms_p50": statistics.median(t * 1000 for t in ttfts),
            "tokens": tokens,
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
