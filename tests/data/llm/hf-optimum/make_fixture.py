#!/usr/bin/env python3
"""Regenerate the `hf-optimum` test fixture: a tiny Llama causal LM exported to
ONNX by Hugging Face optimum, plus reference outputs computed by transformers.

What this script does, in order (all of it deterministic: fixed text, fixed
seeds, no network):

1. Trains a tiny byte-level BPE tokenizer (vocab 512) with the `tokenizers`
   library on the English text embedded below. Special tokens:
   `<|endoftext|>` = 0, `<|im_start|>` = 1, `<|im_end|>` = 2.
2. Builds a randomly initialised 2-layer `LlamaForCausalLM` (GQA: 4 query
   heads, 2 key/value heads, head_dim 16, tied embeddings) with
   `torch.manual_seed(0)` and a large initializer range, so that greedy
   generation depends on the context and is not one token repeated.
3. Saves model (safetensors), tokenizer (with a ChatML chat template like
   SmolLM2's) and generation_config.json to a temporary folder.
4. Exports that folder with optimum (`main_export`, task
   `text-generation-with-past`, fp32) into `tiny-llama/` next to this
   script. Whatever optimum writes there is kept as it is; the ONNX graph is
   not edited.
5. For 6 fixed prompts (4 plain, 2 rendered through the chat template with
   `add_generation_prompt=True`), computes with transformers (PyTorch) the
   prompt's token ids, the last-position logits of the prompt, and the greedy
   16-token continuation (`generate(do_sample=False, max_new_tokens=16)`, KV
   cache on).
6. Checks the exported `model.onnx` with onnxruntime: the prompt run with an
   empty past ([1, kv_heads, 0, head_dim]) must give the same logits within
   1e-4, and greedy decoding step by step, feeding `present.*` back as
   `past_key_values.*`, must give the same 16 tokens. Anything that disagrees
   raises, and nothing is written to reference.json.
7. Writes `reference.json` (prompts, ids, continuations, logits, the graph's
   inputs/outputs, opset and op types).

Usage (from the repository root, with the venv of requirements.txt):

    ~/.cache/kiln/hf-venv/bin/python tests/data/llm/hf-optimum/make_fixture.py

Only needed to regenerate the fixture; CI never runs this.
"""

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
FIXTURE_DIR = HERE / "tiny-llama"
REFERENCE_PATH = HERE / "reference.json"

SEED = 0
VOCAB_SIZE = 512
NEW_TOKENS = 16
LOGITS_ATOL = 1e-4
# Smallest gap allowed between the best and second-best logit at any greedy
# step: far above fp32 noise between runtimes (~1e-5), so that another runtime
# (tract, ONNX Runtime in Rust, ...) picks the same greedy tokens.
MIN_MARGIN = 0.02
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

# The chat template of SmolLM2-style ChatML models (no system prompt injected).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Fixed training text for the tokenizer. Any change here changes every id.
CORPUS = """\
The river town woke slowly in the grey light of morning. Fishermen pulled their
boats onto the stones, and the baker opened her shutters to let the smell of warm
bread drift across the square. Children ran past the fountain on their way to
school, shouting the names of birds they had seen by the water.

A model server is a program that keeps trained models in memory and answers
requests from many users at once. It batches small requests together, streams
tokens back as soon as they are ready, and moves work between machines when one
of them becomes busy or fails. Good servers measure everything: the time to the
first token, the number of tokens per second, and the memory held by each cache.

The old library stood at the end of a narrow street. Its shelves held maps of
forgotten roads, letters from travellers, and books about the stars, the sea and
the seasons. The librarian, a patient man with ink on his fingers, would read
aloud in the evening to anyone who wanted to listen.

user: What is the capital of France?
assistant: The capital of France is Paris, a city on the river Seine.
user: Can you tell me a short story about a cat?
assistant: Once upon a time, a small cat found a warm place in the sun and
decided that the whole garden belonged to her.

Numbers and words mix in everyday life: 12 eggs, 3 apples, 100 pages, 7 days in
a week and 24 hours in a day. People count, measure, compare and remember, and
they write it all down so that others can learn from it tomorrow.
"""

# Fixed prompts. Plain ones are used as they are; chat ones are rendered with
# the chat template (add_generation_prompt=True) before tokenisation.
# (Chosen among candidates so that, with these random weights, no greedy
# continuation reaches EOS or another special token and every greedy step's
# top-2 logit margin is at least MIN_MARGIN; e.g. "A model server is a program
# that" was dropped because its continuation hits <|im_end|> after 1 token.)
PLAIN_PROMPTS = [
    "The river town woke slowly",
    "Once upon a time, a small cat",
    "Numbers and words: 12 eggs, 3 apples,",
    "Children ran past the fountain",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Tell me a story about the old library."}],
]


def fail(msg: str) -> None:
    """Fail loudly: nothing may be silently wrong in a fixture."""
    raise SystemExit(f"FIXTURE CHECK FAILED: {msg}")


def set_seeds() -> None:
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


# --------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------
def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers all bytes
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # As in GPT-2 / SmolLM2 tokenizer.json: a ByteLevel post-processor that only
    # fixes offsets (it adds no tokens).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,  # get ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            fail(f"special token {t} has id {tok.token_to_id(t)}, expected {i}")
    return tok


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


# --------------------------------------------------------------------------
# 2. Model
# --------------------------------------------------------------------------
def build_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        # A large init range (default 0.02) keeps the random logits spread out
        # enough that greedy decoding follows the context instead of
        # collapsing onto one token.
        initializer_range=0.2,
        dtype="float32",
    )
    set_seeds()
    model = LlamaForCausalLM(config)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


# --------------------------------------------------------------------------
# 5. Reference outputs from transformers
# --------------------------------------------------------------------------
def build_prompts(hf_tok: PreTrainedTokenizerFast):
    prompts = []
    for text in PLAIN_PROMPTS:
        prompts.append({"kind": "plain", "messages": None, "text": text})
    for messages in CHAT_PROMPTS:
        text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append({"kind": "chat", "messages": messages, "text": text})
    return prompts


@torch.no_grad()
def torch_reference(model, hf_tok, bare_tok: Tokenizer, prompt):
    text = prompt["text"]
    ids = hf_tok(text)["input_ids"]
    # The bare tokenizers.Tokenizer (what a Rust `tokenizers` loader sees) must
    # agree with the transformers wrapper.
    bare_ids = bare_tok.encode(text).ids
    if bare_ids != ids:
        fail(f"tokenizer.json and the transformers tokenizer disagree on {text!r}: {bare_ids} vs {ids}")
    if prompt["kind"] == "chat":
        templ_ids = hf_tok.apply_chat_template(prompt["messages"], tokenize=True, add_generation_prompt=True)
        if list(templ_ids) != ids:
            fail(f"apply_chat_template(tokenize=True) differs from tokenising the rendered text for {text!r}")
    if hf_tok.decode(ids) != text:
        fail(f"decode(encode(text)) != text for {text!r}")

    input_ids = torch.tensor([ids], dtype=torch.long)
    attn = torch.ones_like(input_ids)
    all_logits = model(input_ids=input_ids, attention_mask=attn).logits[0]  # [seq, vocab]
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attn,
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        use_cache=True,
        pad_token_id=0,
    )
    new_ids = out[0, len(ids):].tolist()
    if len(new_ids) != NEW_TOKENS:
        fail(f"generate stopped early for {text!r} (EOS reached?): {new_ids}")
    return ids, all_logits.float().numpy(), new_ids


# --------------------------------------------------------------------------
# 6. onnxruntime checks
# --------------------------------------------------------------------------
def ort_type_to_np(t: str):
    return {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
            "tensor(float16)": np.float16, "tensor(bool)": np.bool_}[t]


class OrtDecoder:
    """Runs the optimum 'decoder with past' model.onnx the way a server would."""

    def __init__(self, path: Path, num_kv_heads: int, head_dim: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        known = {"input_ids", "attention_mask", "position_ids", *self.past_names}
        extra = set(self.inputs) - known
        if extra:
            fail(f"model.onnx has inputs this script does not know how to feed: {sorted(extra)}")

    def empty_past(self):
        return {
            n: np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=ort_type_to_np(self.inputs[n].type))
            for n in self.past_names
        }

    def step(self, ids, past, past_len):
        seq = len(ids)
        feed = {
            "input_ids": np.array([ids], dtype=ort_type_to_np(self.inputs["input_ids"].type)),
            # 1 = attend; covers the past and the new tokens.
            "attention_mask": np.ones((1, past_len + seq), dtype=ort_type_to_np(self.inputs["attention_mask"].type)),
        }
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, past_len + seq, dtype=ort_type_to_np(self.inputs["position_ids"].type))[None, :]
        feed.update(past)
        outs = dict(zip(self.output_names, self.sess.run(None, feed)))
        logits = outs["logits"]  # [1, seq, vocab]
        new_past = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return logits, new_past


def check_with_ort(dec: OrtDecoder, ids, torch_logits, torch_new_ids, text):
    logits, past = dec.step(ids, dec.empty_past(), 0)
    if logits.dtype != np.float32:
        fail(f"logits dtype is {logits.dtype}, expected float32")
    if logits.shape != (1, len(ids), torch_logits.shape[-1]):
        fail(f"logits shape {logits.shape}")
    # Every prompt position, not just the last, must match.
    diff = float(np.max(np.abs(logits[0] - torch_logits)))
    if diff > LOGITS_ATOL:
        fail(f"onnxruntime prompt logits differ from torch by {diff} for {text!r}")
    for n, v in past.items():
        if v.shape != (1, dec.num_kv_heads, len(ids), dec.head_dim):
            fail(f"present for {n} has shape {v.shape}")
    # Greedy decode, feeding present back as past.
    got = []
    past_len = len(ids)
    step_diff = 0.0
    nxt = int(np.argmax(logits[0, -1]))
    while True:
        got.append(nxt)
        if len(got) == NEW_TOKENS:
            break
        logits, past = dec.step([nxt], past, past_len)
        past_len += 1
        nxt = int(np.argmax(logits[0, -1]))
    if got != torch_new_ids:
        fail(f"onnxruntime greedy tokens {got} != transformers {torch_new_ids} for {text!r}")
    return diff


@torch.no_grad()
def check_torch_incremental(model, ids, new_ids, text):
    """Also check with torch itself: full-sequence logits vs. the greedy ids
    (every greedy token must be the argmax of a no-cache forward pass)."""
    full = torch.tensor([ids + new_ids])
    logits = model(input_ids=full).logits[0]
    argmax = logits[len(ids) - 1:-1].argmax(-1).tolist()
    if argmax != new_ids:
        fail(f"generate() (KV cache) and a no-cache forward pass disagree for {text!r}")
    # Margin between the top two logits at each greedy step: a tiny margin
    # would make the fixture fragile across runtimes.
    top2 = logits[len(ids) - 1:-1].topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


# --------------------------------------------------------------------------
# Graph description
# --------------------------------------------------------------------------
def describe_graph(path: Path):
    m = onnx.load(str(path), load_external_data=False)

    def vi(v):
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                 for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    external = [i.name for i in m.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    return {
        "inputs": [vi(v) for v in m.graph.input],
        "outputs": [vi(v) for v in m.graph.output],
        "opset": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "ir_version": m.ir_version,
        "producer": f"{m.producer_name} {m.producer_version}",
        "op_types": sorted({n.op_type for n in m.graph.node}),
        "num_nodes": len(m.graph.node),
        "external_data_initializers": external,
    }


def main() -> None:
    from optimum.exporters.onnx import main_export
    import optimum.version
    import tokenizers as tokenizers_mod
    from importlib.metadata import version as pkg_version

    torch.set_num_threads(1)  # determinism and a small footprint
    set_seeds()

    bare_tok = train_tokenizer()
    vocab_size = bare_tok.get_vocab_size(with_added_tokens=True)
    print(f"tokenizer vocab size: {vocab_size}")
    hf_tok = wrap_tokenizer(bare_tok)
    if len(hf_tok) != vocab_size:
        fail(f"len(hf tokenizer) {len(hf_tok)} != {vocab_size}")

    model = build_model(vocab_size)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model parameters: {n_params}")

    # ---- 3 + 4: save to a temp dir and export with optimum ----
    if FIXTURE_DIR.exists():
        shutil.rmtree(FIXTURE_DIR)
    with tempfile.TemporaryDirectory(prefix="kiln-tiny-llama-") as tmp:
        src = Path(tmp) / "tiny-llama"
        model.save_pretrained(src, safe_serialization=True)
        hf_tok.save_pretrained(src)
        print("saved source model:", sorted(os.listdir(src)))
        main_export(
            model_name_or_path=str(src),
            output=str(FIXTURE_DIR),
            task="text-generation-with-past",
            dtype="fp32",
            device="cpu",
            framework="pt",
            library_name="transformers",
            local_files_only=True,
            do_validation=True,  # optimum's own torch-vs-ORT check
        )
    print("optimum wrote:", sorted(os.listdir(FIXTURE_DIR)))
    onnx_path = FIXTURE_DIR / "model.onnx"
    if not onnx_path.exists():
        fail(f"no model.onnx in {FIXTURE_DIR}")
    extra_data = [p.name for p in FIXTURE_DIR.iterdir() if p.name.endswith((".onnx_data", ".data"))]
    if extra_data:
        fail(f"external data files were written: {extra_data}")

    graph = describe_graph(onnx_path)
    print("ONNX inputs:")
    for v in graph["inputs"]:
        print(f"  {v['name']:32s} {v['dtype']:8s} {v['shape']}")
    print("ONNX outputs:")
    for v in graph["outputs"]:
        print(f"  {v['name']:32s} {v['dtype']:8s} {v['shape']}")
    print("opset:", graph["opset"], "ir_version:", graph["ir_version"], "producer:", graph["producer"])
    print("op types:", graph["op_types"])
    if graph["external_data_initializers"]:
        fail(f"initializers stored as external data: {graph['external_data_initializers'][:5]}")

    # ---- 5 + 6: references and checks ----
    # Reload the tokenizer that optimum wrote: the references must be what a
    # loader of the fixture folder sees.
    fx_tok = transformers.AutoTokenizer.from_pretrained(str(FIXTURE_DIR))
    fx_bare = Tokenizer.from_file(str(FIXTURE_DIR / "tokenizer.json"))
    dec = OrtDecoder(onnx_path, cfg.num_key_value_heads, head_dim)
    prompts = build_prompts(fx_tok)
    records = []
    for p in prompts:
        ids, all_logits, new_ids = torch_reference(model, fx_tok, fx_bare, p)
        margin = check_torch_incremental(model, ids, new_ids, p["text"])
        diff = check_with_ort(dec, ids, all_logits, new_ids, p["text"])
        special = [i for i in new_ids if i in (0, 1, 2)]
        if special:
            fail(f"greedy continuation of {p['text']!r} contains special tokens {special}")
        if margin < MIN_MARGIN:
            fail(f"greedy top-2 margin {margin} < {MIN_MARGIN} for {p['text']!r}: fragile across runtimes")
        if len(set(new_ids)) < 4:
            fail(f"degenerate continuation for {p['text']!r}: {new_ids}")
        text_new = fx_tok.decode(new_ids, skip_special_tokens=False)
        print(f"- {p['text']!r}: {len(ids)} ids, ort max|dlogit|={diff:.2e}, min top-2 margin={margin:.3f}")
        print(f"    -> {new_ids}  {text_new!r}")
        rec = {
            "kind": p["kind"],
            "text": p["text"],
            "input_ids": ids,
            "new_ids": new_ids,
            # Byte-level token strings (GPT-2 byte-to-unicode alphabet). The
            # random model emits arbitrary bytes, so new_text may contain
            # U+FFFD (invalid UTF-8, decoded lossily as tokenizers does) and
            # control characters.
            "new_tokens": fx_tok.convert_ids_to_tokens(new_ids),
            "new_text": text_new,
            "last_logits": [round(float(x), 5) for x in all_logits[-1]],
            "last_argmax": int(np.argmax(all_logits[-1])),
            "min_greedy_top2_margin": round(margin, 5),
        }
        if p["messages"] is not None:
            rec["messages"] = p["messages"]
        records.append(rec)
    conts = [tuple(r["new_ids"]) for r in records]
    if len(set(conts)) != len(conts):
        fail("two prompts gave the same continuation: the model ignores its context")
    if len({r["last_argmax"] for r in records}) < 3:
        fail("next-token argmax hardly depends on the prompt")

    reference = {
        "description": "Reference outputs of transformers (PyTorch, fp32) for tiny-llama/, "
                       "a random tiny Llama exported by optimum. Made by make_fixture.py.",
        "model_dir": "tiny-llama",
        "greedy": {"do_sample": False, "max_new_tokens": NEW_TOKENS, "use_cache": True,
                   "note": "no continuation reaches EOS or any special token"},
        "logits_rounding_decimals": 5,
        "logits_atol_checked_with_onnxruntime": LOGITS_ATOL,
        "config": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": head_dim,
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": 0,
            "num_parameters": n_params,
        },
        "special_tokens": {t: i for i, t in enumerate(SPECIAL_TOKENS)},
        "chat_template": CHAT_TEMPLATE,
        "graph": graph,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "optimum": optimum.version.__version__, "optimum-onnx": pkg_version("optimum-onnx"),
            "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "tokenizers": tokenizers_mod.__version__, "numpy": np.__version__,
        },
        "prompts": records,
    }
    with open(REFERENCE_PATH, "w") as f:
        json.dump(reference, f, indent=1)
        f.write("\n")
    print(f"wrote {REFERENCE_PATH}")
    print("ALL CHECKS PASSED")


if __name__ == "__main__":
    main()
