#!/usr/bin/env python3
"""Throughput baseline for all-MiniLM-L6-v2 with the Python onnxruntime package.

Gives a number to hold Kiln's embedding throughput against: the same model,
the same sequence length (16 tokens including [CLS]/[SEP]) and the same amount
of work per embedding (tokenize, run, mean-pool, L2-normalise), done by the
stock Python stack.

    python3 tests/python/ort_baseline.py --model-dir ~/.cache/kiln/assets/all-minilm-l6-v2 \
        --threads 2 --clients 32 --seconds 5 --batch 32

--model-dir   folder with model.onnx and tokenizer.json
              (default: $KILN_ASSET_DIR/all-minilm-l6-v2, else ~/.cache/kiln/assets/...)
--threads N   onnxruntime intra_op_num_threads (inter_op 1, sequential execution)
--clients C   number of distinct 16-token sentences, one per simulated client;
              batches take sentences from this pool round-robin, as a server
              batching C clients' single-sentence requests would see them
--seconds S   how long the throughput loop runs (after a short warm-up)
--batch B     sequences per session.run call (default 32)

Throughput loop, per batch: tokenizer.encode_batch on B sentences, one
session.run on int64 [B, 16] inputs, mean pooling over the attention mask and
L2 normalisation in numpy; embeddings_per_s = B * batches / elapsed.
Latency: one 16-token sentence (encode + run + pool + normalise), 200 runs
after warm-up; p50_ms_single is the median in milliseconds.

Prints ONE JSON line on stdout:
    {"embeddings_per_s": float, "p50_ms_single": float, "threads": N, "batch": B, ...}
(extra keys: clients, seq_len, seconds, batches, onnxruntime, loadavg_1m_before,
cpus; run it on an otherwise idle machine: a concurrent build halves the figures)
"""

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

SEQ_LEN = 16  # including [CLS] and [SEP]
LATENCY_RUNS = 200

# Common English words; only those that the tokenizer keeps as one WordPiece
# token are used, so 13 of them plus "." and [CLS]/[SEP] make exactly 16 tokens.
WORDS = """
the a man woman child dog cat bird house car road city river tree garden
small large old new quick slow happy quiet bright dark green blue red warm
cold early late walks runs reads writes plays sings builds opens finds sees
takes gives makes likes wants needs keeps leaves near over under behind
with from into after before during today tomorrow morning evening night
water music book letter window door table chair kitchen school market
office train station bridge street park beach mountain forest village
friend teacher doctor family people every always never often slowly
""".split()


def default_model_dir() -> Path:
    base = os.environ.get("KILN_ASSET_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "kiln" / "assets"
    return root / "all-minilm-l6-v2"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="ONNX Runtime (Python) embedding throughput baseline")
    p.add_argument("--model-dir", type=Path, default=default_model_dir())
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.threads < 1 or args.clients < 1 or args.batch < 1 or args.seconds <= 0:
        p.error("--threads, --clients, --batch must be >= 1 and --seconds > 0")
    return args


def load_tokenizer(model_dir: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def make_sentences(tok: Tokenizer, count: int, seed: int) -> list:
    """`count` distinct word sequences that each encode to exactly SEQ_LEN tokens."""
    single = [w for w in WORDS if len(tok.encode(w, add_special_tokens=False).ids) == 1]
    if len(single) < 20:
        raise RuntimeError("too few single-token words for this tokenizer")
    rng = random.Random(seed)
    sentences, seen = [], set()
    while len(sentences) < count:
        # [CLS] + 13 single-token words + "." + [SEP] = 16 tokens.
        words = [rng.choice(single) for _ in range(SEQ_LEN - 3)]
        text = " ".join(words).capitalize() + "."
        if text in seen:
            continue
        n = len(tok.encode(text).ids)
        if n != SEQ_LEN:
            raise RuntimeError(f"sentence {text!r} has {n} tokens, want {SEQ_LEN}")
        seen.add(text)
        sentences.append(text)
    return sentences


def make_session(model_dir: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(
        str(model_dir / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
    )


def embed(tok: Tokenizer, session: ort.InferenceSession, texts: list) -> np.ndarray:
    encs = tok.encode_batch(texts)
    ids = np.asarray([e.ids for e in encs], dtype=np.int64)
    mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
    types = np.zeros_like(ids)
    (hidden,) = session.run(
        ["last_hidden_state"],
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
    )
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    tok = load_tokenizer(args.model_dir)
    session = make_session(args.model_dir, args.threads)
    sentences = make_sentences(tok, args.clients, args.seed)

    # Batches drawn round-robin from the client pool.
    batches = [
        [sentences[(b * args.batch + i) % len(sentences)] for i in range(args.batch)]
        for b in range(max(1, len(sentences)))
    ]

    # Sanity check and warm-up.
    out = embed(tok, session, batches[0])
    assert out.shape == (args.batch, 384), out.shape
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    for i in range(3):
        embed(tok, session, batches[i % len(batches)])

    # Throughput.
    done = 0
    start = time.perf_counter()
    deadline = start + args.seconds
    while True:
        embed(tok, session, batches[done % len(batches)])
        done += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - start
    embeddings_per_s = done * args.batch / elapsed

    # Single-request latency.
    single = [sentences[0]]
    for _ in range(10):
        embed(tok, session, single)
    times = []
    for _ in range(LATENCY_RUNS):
        t0 = time.perf_counter()
        embed(tok, session, single)
        times.append(time.perf_counter() - t0)
    p50_ms = float(np.median(times) * 1000.0)

    print(json.dumps({
        "embeddings_per_s": round(embeddings_per_s, 1),
        "p50_ms_single": round(p50_ms, 3),
        "threads": args.threads,
        "batch": args.batch,
        "clients": args.clients,
        "seq_len": SEQ_LEN,
        "seconds": round(elapsed, 3),
        "batches": done,
        "onnxruntime": ort.__version__,
        # A 1-minute load average near or above the core count means another
        # process (e.g. a build) shared the CPU and the figures are low.
        "loadavg_1m_before": round(load_before, 2),
        "cpus": os.cpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
