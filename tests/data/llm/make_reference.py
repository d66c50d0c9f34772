#!/usr/bin/env python3
"""Generate independent llama.cpp reference data for the Kiln LLM path.

Model: SmolLM2-135M-Instruct, Q4_1 GGUF (llama arch, 30 layers, vocab 49152,
ChatML chat template in the GGUF metadata, BOS id 1, EOS id 2, add_bos_token false).

The reference is produced with llama.cpp through its Python binding
(llama-cpp-python, see tests/python/requirements-reference.txt) and written next to this
script as reference.json:

  * "prompts": for each fixed prompt, llama.cpp's tokenization (add_bos=False,
    special=True), the teacher-forced greedy next token after every prefix
    tokens[0..=i] ("argmax_next", one entry per position, from a single
    evaluation of the whole sequence), "argmax_margin" (top-1 minus top-2 logit
    at each position; a small margin means a fragile argmax that another
    implementation may legitimately flip), and the top-5 (token id, logit)
    pairs at the last position.
  * "tokenization": llama.cpp's tokenization of tricky strings (digits,
    unicode, whitespace, code, ChatML special tokens) plus the detokenized text
    (llm.detokenize(ids), which drops control tokens such as <|im_start|>) and
    "detokenized_special" (detokenize with special=True, which renders them).
  * "chat": greedy (temperature 0, max 48 tokens) answers from
    llm.create_chat_completion, which applies the GGUF chat template (and hence
    the template's default system prompt).  The exact prompt token ids are the
    template rendered with jinja2 here (add_generation_prompt=True) and
    tokenized with special=True; the answer token ids come from an explicit
    eval + argmax loop (stopping at EOS id 2 or after 48 tokens) and are
    checked to decode to the same text as the chat-completion answer.
    "answer_margins" holds the top-1/top-2 logit gap of every greedy step,
    including the final step that chose EOS when generation stopped before 48
    tokens (so it has one more entry than answer_tokens in that case).

Logits are quantised-model outputs and are rounded to 4 decimals; only the
last-position top-5 are stored to keep the file small.  Compare argmax tokens
exactly, logits with a tolerance.

Rerun (from the repository root):

    python3 -m pip install -r tests/python/requirements-reference.txt
    python3 tests/data/llm/make_reference.py [gguf_path]

gguf_path defaults to
~/.cache/kiln/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf.
"""

import json
import os
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox
import llama_cpp
import numpy as np

DEFAULT_GGUF = os.path.expanduser(
    "~/.cache/kiln/assets/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
)
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.json")
EOS_ID = 2
MAX_TOKENS = 48

PROMPTS = [
    "The capital of France is",
    "What is the tallest mountain in the world?",
    "Write a short poem about the ocean.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors:\n1.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "import numpy as np\n\nx = np.arange(10)\nprint(x.",
    "Translate to French: Good morning, how are you?",
    "2 + 2 = 4, 3 + 3 = 6, 4 + 4 =",
    "The year 1969 was important because",
    "In 2024, the population of Tokyo was about 14,000,000 people.",
    "Once upon a time, in a small village, there lived a",
    "Q: What is 12 times 12?\nA:",
    "Here is a shopping list:\n- eggs\n- milk\n-",
    "Summarize: The quick brown fox jumps over the lazy dog.",
    "Hello! My name is Alice. What's your name?",
    "The speed of light is approximately 299,792,458 meters per second.",
    "Steps to make tea: boil water, add the tea bag, wait 3-5 minutes, then",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY",
    "Pi is 3.14159; e is 2.71828; the golden ratio is",
    "Rust is a systems programming language that",
    "{\"name\": \"Kiln\", \"version\": \"1.0\", \"tags\": [",
    "Why do cats purr? Give two reasons.",
    "Monday, Tuesday, Wednesday, Thursday,",
    "<|im_start|>user\nWhat is 5 + 7?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName a fruit that is yellow.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nSay hello in Spanish.<|im_end|>\n<|im_start|>assistant\n",
]

TOKENIZATION_STRINGS = [
    "12345",
    "3.14159",
    "café naïve 日本語 🙂",
    "  two spaces",
    "a\n\nb",
    "def f(x):\n    return x**2",
    "<|im_start|>user\nhi<|im_end|>",
    "Hello world",
    " Hello",
    "HELLO, World!!!",
    "don't won't it's we'll they've",
    "a  b   c    d",
    "\ttab\tseparated\n",
    "1,000,000 and 2024-01-15",
    "e = mc^2 // 100%",
    "https://example.com/path?q=1&r=2",
    "<|endoftext|><|im_end|>",
    "",
]

CHAT_QUESTIONS = [
    "What is the capital of Japan?",
    "What is the opposite of hot?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
]


def tokenize(llm, text):
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def eval_sequence(llm, tokens):
    """Evaluate tokens from an empty context; return logits for every position."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def render_chat_template(llm, messages):
    """Render the GGUF chat template the way llama-cpp-python's Jinja2ChatFormatter does."""
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8")
    return env.from_string(template).render(
        messages=messages,
        bos_token=bos,
        eos_token=eos,
        add_generation_prompt=True,
    )


def top1_margin(row):
    """Logit gap between the best and second-best token (small = fragile argmax)."""
    a, b = np.partition(row, -2)[-2:]
    return round(float(b - a), 3)


def greedy_generate(llm, prompt_tokens, max_tokens=MAX_TOKENS):
    """Greedy eval + argmax loop; returns (generated ids without EOS, margin per step)."""
    llm.reset()
    llm.eval(prompt_tokens)
    out, margins = [], []
    while len(out) < max_tokens:
        row = llm.scores[llm.n_tokens - 1]
        nxt = int(np.argmax(row))
        margins.append(top1_margin(row))
        if nxt == EOS_ID:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out, margins


def dump_json(ref):
    """JSON with one list entry per line: readable diffs, compact number lists."""
    parts = []
    for key, value in ref.items():
        if isinstance(value, list):
            items = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value)
            parts.append(f"{json.dumps(key)}: [\n{items}\n ]")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
    text = "{\n " + ",\n ".join(parts) + "\n}\n"
    assert json.loads(text) == json.loads(json.dumps(ref))
    return text


def main():
    gguf_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_GGUF
    llm = llama_cpp.Llama(
        model_path=gguf_path,
        n_ctx=2048,
        logits_all=True,
        n_threads=2,
        verbose=False,
        seed=0,
    )
    assert llm.n_vocab() == 49152, llm.n_vocab()
    assert llm.token_bos() == 1 and llm.token_eos() == EOS_ID

    prompts = []
    for text in PROMPTS:
        tokens = tokenize(llm, text)
        logits = eval_sequence(llm, tokens)
        assert logits.shape == (len(tokens), 49152), logits.shape
        last = logits[-1]
        top5 = np.argsort(-last, kind="stable")[:5]
        prompts.append(
            {
                "text": text,
                "tokens": tokens,
                "argmax_next": [int(t) for t in np.argmax(logits, axis=1)],
                "argmax_margin": [top1_margin(row) for row in logits],
                "last_top5": [[int(t), round(float(last[t]), 4)] for t in top5],
            }
        )

    tokenization = []
    for text in TOKENIZATION_STRINGS:
        ids = tokenize(llm, text)
        tokenization.append(
            {
                "text": text,
                "tokens": ids,
                "detokenized": llm.detokenize(ids).decode("utf-8", errors="replace"),
                "detokenized_special": llm.detokenize(ids, special=True).decode(
                    "utf-8", errors="replace"
                ),
            }
        )

    chat = []
    for question in CHAT_QUESTIONS:
        messages = [{"role": "user", "content": question}]
        llm.reset()
        resp = llm.create_chat_completion(
            messages=messages, temperature=0, max_tokens=MAX_TOKENS
        )
        answer = resp["choices"][0]["message"]["content"]
        prompt_text = render_chat_template(llm, messages)
        prompt_tokens = tokenize(llm, prompt_text)
        assert resp["usage"]["prompt_tokens"] == len(prompt_tokens), (
            resp["usage"],
            len(prompt_tokens),
        )
        answer_tokens, answer_margins = greedy_generate(llm, prompt_tokens)
        decoded = llm.detokenize(answer_tokens).decode("utf-8", errors="replace")
        if decoded != answer:
            raise SystemExit(
                f"greedy loop disagrees with create_chat_completion for {question!r}:\n"
                f"  loop: {decoded!r}\n  chat: {answer!r}"
            )
        chat.append(
            {
                "question": question,
                "prompt_tokens": prompt_tokens,
                "answer_tokens": answer_tokens,
                "answer_margins": answer_margins,
                "answer": answer,
            }
        )

    ref = {
        "model": os.path.basename(gguf_path),
        "generated_by": "tests/data/llm/make_reference.py",
        "llama_cpp_python": llama_cpp.__version__,
        "prompts": prompts,
        "tokenization": tokenization,
        "chat": chat,
    }
    with open(OUT_PATH, "w", encoding="utf-8") as f:
        f.write(dump_json(ref))
    print(f"wrote {OUT_PATH}: {len(prompts)} prompts, {len(tokenization)} strings, {len(chat)} chats")


if __name__ == "__main__":
    main()
