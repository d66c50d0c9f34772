#!/usr/bin/env python3
"""Generate independent llama.cpp reference data for Kiln's LoRA path.

Model: SmolLM2-135M-Instruct, Q4_1 GGUF (as tests/data/llm/make_reference.py).
Adapter: the PEFT adapter `kiln_tests::lora::seeded_lora(SEED, R, MODULES, B_SCALE, false)`
writes, rebuilt here from the same splitmix64 numbers with the same float32 arithmetic: rank
R on q_proj and v_proj of all 30 layers, lora_alpha 2R (scale 2), A uniform in
+-1/sqrt(in), B uniform in +-B_SCALE, in PyTorch's layout (lora_A [r, in], lora_B [out, r]).

llama.cpp applies adapters in its own GGUF-LoRA format: the script converts the PEFT
adapter the way llama.cpp's convert_lora_to_gguf.py does (general.type "adapter",
adapter.type "lora", adapter.lora.alpha; tensors blk.N.attn_q.weight.lora_a [r, in] and
.lora_b [out, r]), including the one change its converter makes to HF tensors: the rows of
q's lora_B are permuted to llama.cpp's interleaved rotary order (LlamaModel.permute), since
the base GGUF's attn_q rows are. Kiln un-permutes the base instead and applies the PEFT
tensors as they are, so the two sides meet only if both are right.

Writes reference.json next to this script: for the first PROMPTS of
tests/data/llm/reference.json, the tokens and llama.cpp's argmax next token at every position
with the adapter applied (one evaluation of the whole prompt), the top-1 minus top-2 logit
margin, and the same argmax without the adapter (so a test can check the adapter matters).

Rerun (from the repository root):

    python3 -m pip install -r tests/python/requirements-reference.txt
    python3 tests/data/llm/lora/make_reference.py [gguf_path]
"""

import json
import os
import sys
import tempfile

import gguf
import llama_cpp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GGUF = os.path.expanduser(
    "~/.cache/kiln/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
)
SEED = 4242
R = 8
B_SCALE = np.float32(0.5)
PROMPTS = 12
LAYERS = 30
HEADS = 9
# (HF module, GGUF infix, in, out) in the order seeded_lora draws them.
MODULES = [("q_proj", "attn_q", 576, 576), ("v_proj", "attn_v", 576, 192)]
MASK = (1 << 64) - 1


class Numbers:
    """splitmix64, as kiln_tests::lora's Numbers: uniform float32 in [-1, 1)."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        return np.float32(z >> 40) / np.float32(1 << 24) * np.float32(2) - np.float32(1)

    def array(self, count, scale):
        values = np.array([self.next() for _ in range(count)], dtype=np.float32)
        return values * np.float32(scale)


def adapter():
    """{(layer, infix): (A [r, in], B [out, r])}, drawn as seeded_lora draws them."""
    numbers = Numbers(SEED)
    out = {}
    for layer in range(LAYERS):
        for _, infix, inputs, outputs in MODULES:
            bound = np.float32(1) / np.sqrt(np.float32(inputs))
            a = numbers.array(R * inputs, bound).reshape(R, inputs)
            b = numbers.array(outputs * R, B_SCALE).reshape(outputs, R)
            out[(layer, infix)] = (a, b)
    return out


def permute(rows, heads):
    """llama.cpp's LlamaModel.permute of the output rows (HF half rotation -> interleaved)."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def write_lora_gguf(path, weights):
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(2 * R))
    for (layer, infix), (a, b) in weights.items():
        if infix == "attn_q":
            b = permute(b, HEADS)
        writer.add_tensor(f"blk.{layer}.{infix}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"blk.{layer}.{infix}.weight.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def predictions(llm, tokens):
    llm.reset()
    llm.eval(tokens)
    logits = np.array(llm.scores[: llm.n_tokens], dtype=np.float32)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return [int(t) for t in logits.argmax(axis=1)], [round(float(m), 4) for m in top2[:, 1] - top2[:, 0]]


def main():
    gguf_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF
    base_reference = json.load(open(os.path.join(HERE, "..", "reference.json")))
    prompts = [p["tokens"] for p in base_reference["prompts"][:PROMPTS]]
    with tempfile.TemporaryDirectory() as tmp:
        lora_path = os.path.join(tmp, "adapter.gguf")
        write_lora_gguf(lora_path, adapter())
        common = dict(model_path=gguf_path, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
        with_lora = llama_cpp.Llama(lora_path=lora_path, **common)
        adapted = [predictions(with_lora, p) for p in prompts]
        del with_lora
        plain = llama_cpp.Llama(**common)
        bare = [predictions(plain, p)[0] for p in prompts]
    out = {
        "seed": SEED,
        "r": R,
        "b_scale": float(B_SCALE),
        "modules": [m for m, _, _, _ in MODULES],
        "prompts": [
            {"tokens": p, "argmax_next": a[0], "argmax_margin": a[1], "argmax_next_without": b}
            for p, a, b in zip(prompts, adapted, bare)
        ],
    }
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    changed = sum(x != y for a, b in zip(adapted, bare) for x, y in zip(a[0], b))
    total = sum(len(p) for p in prompts)
    print(f"wrote reference.json: {total} positions, the adapter changes {changed} argmaxes")


if __name__ == "__main__":
    main()
