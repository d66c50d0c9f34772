#!/usr/bin/env python3
"""Generate reference sentence embeddings for all-MiniLM-L6-v2.

This script computes embeddings independently of Kiln, using only the Python
`tokenizers`, `onnxruntime` and `numpy` packages, and writes them to
`reference.json` next to this file. Kiln's tests compare their own embeddings
against these numbers.

Rerun it with:

    python3 -m pip install -r tests/python/requirements.txt
    python3 tests/data/embeddings/make_reference.py [asset_dir]

`asset_dir` defaults to $KILN_ASSET_DIR, or ~/.cache/kiln/assets when that is
unset. It must contain `all-minilm-l6-v2/model.onnx` and
`all-minilm-l6-v2/tokenizer.json`.

Method, per sentence (each sentence is run alone, batch size 1):
  * tokenize with special tokens ([CLS] ... [SEP]); the padding and truncation
    configured inside tokenizer.json are switched off;
  * run the ONNX model with input_ids, attention_mask (ones) and
    token_type_ids (zeros), all int64 of shape [1, n];
  * mean-pool last_hidden_state [1, n, 384] over the attention mask;
  * L2-normalise.

Floats are rounded to 7 significant digits. The script asserts that every
close pair's cosine similarity exceeds every unrelated pair's, and that the
sentence meant to be 16 tokens long really is.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

MODEL = "all-minilm-l6-v2"
GENERATED_BY = "tests/data/embeddings/make_reference.py"

SENTENCES = [
    "A man is playing a guitar.",                                         # 0
    "Someone is strumming a guitar.",                                     # 1
    "The cat is sleeping on the sofa.",                                   # 2
    "A kitten is napping on the couch.",                                  # 3
    "How do I reset my password?",                                        # 4
    "I forgot my password and need to change it.",                        # 5
    "The stock market fell sharply today.",                               # 6
    "Share prices dropped steeply this afternoon.",                       # 7
    "Fresh bread is baked every morning at the bakery.",                  # 8
    "Quantum computers use qubits to perform calculations.",              # 9
    "Heavy rain is expected throughout the weekend.",                     # 10
    "The quick brown fox jumps over the lazy dog near the river bank.",   # 11: 16 tokens
]

SIXTEEN_TOKEN_INDEX = 11

CLOSE_PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7]]

UNRELATED_PAIRS = [[0, 6], [1, 9], [2, 10], [3, 4], [5, 8], [7, 11], [9, 2], [8, 0]]


def asset_dir_from_args() -> Path:
    if len(sys.argv) > 2:
        sys.exit(f"usage: {sys.argv[0]} [asset_dir]")
    if len(sys.argv) == 2:
        return Path(sys.argv[1])
    env = os.environ.get("KILN_ASSET_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "kiln" / "assets"


def round_sig(x: float, digits: int = 7) -> float:
    return float(f"{x:.{digits}g}")


def main() -> None:
    assets = asset_dir_from_args() / MODEL
    tokenizer = Tokenizer.from_file(str(assets / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(assets / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
    )

    token_ids = []
    embeddings = []
    for sentence in SENTENCES:
        enc = tokenizer.encode(sentence, add_special_tokens=True)
        ids = np.asarray([enc.ids], dtype=np.int64)
        mask = np.ones_like(ids)
        types = np.zeros_like(ids)
        (hidden,) = session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": types},
        )
        assert hidden.shape == (1, ids.shape[1], 384), hidden.shape
        m = mask[..., None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        token_ids.append([int(t) for t in enc.ids])
        embeddings.append(pooled[0])

    token_counts = [len(t) for t in token_ids]
    assert token_counts[SIXTEEN_TOKEN_INDEX] == 16, (
        f"sentence {SIXTEEN_TOKEN_INDEX} has {token_counts[SIXTEEN_TOKEN_INDEX]} tokens, want 16"
    )
    for ids in token_ids:
        assert ids[0] == 101 and ids[-1] == 102, ids  # [CLS] ... [SEP]

    emb = np.stack(embeddings)
    cos = emb @ emb.T
    close = [float(cos[i, j]) for i, j in CLOSE_PAIRS]
    unrelated = [float(cos[i, k]) for i, k in UNRELATED_PAIRS]
    assert min(close) > max(unrelated), (
        f"min close cosine {min(close):.4f} <= max unrelated cosine {max(unrelated):.4f}"
    )

    out = {
        "model": MODEL,
        "generated_by": GENERATED_BY,
        "sentences": SENTENCES,
        "token_counts": token_counts,
        "token_ids": token_ids,
        "embeddings": [[round_sig(float(x)) for x in row] for row in emb],
        "close_pairs": CLOSE_PAIRS,
        "unrelated_pairs": UNRELATED_PAIRS,
    }

    # One top-level key per line and one row per line, so diffs stay readable.
    lines = ["{"]
    keys = list(out)
    for n, key in enumerate(keys):
        value = out[key]
        comma = "," if n + 1 < len(keys) else ""
        if isinstance(value, list) and value and isinstance(value[0], (list, str)):
            lines.append(f"  {json.dumps(key)}: [")
            for r, row in enumerate(value):
                rc = "," if r + 1 < len(value) else ""
                lines.append(f"    {json.dumps(row)}{rc}")
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    path = Path(__file__).resolve().parent / "reference.json"
    path.write_text("\n".join(lines) + "\n")
    json.loads(path.read_text())  # sanity: the file parses

    print(f"wrote {path}")
    print(f"token counts: {token_counts}")
    print("close pairs:     " + ", ".join(f"{p}={c:.4f}" for p, c in zip(CLOSE_PAIRS, close)))
    print("unrelated pairs: " + ", ".join(f"{p}={c:.4f}" for p, c in zip(UNRELATED_PAIRS, unrelated)))


if __name__ == "__main__":
    main()
