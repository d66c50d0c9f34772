"""Writes the fuzz targets' first seeds into tests/fuzz/corpus/<target>/ (small valid inputs of
each format; the fuzzer mutates from them). Crashes found later are added beside them by hand,
as regression inputs. Run: python3 tests/fuzz/make_seeds.py"""

import json
import os
import struct

import tritonclient.grpc.service_pb2 as oip

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def seed(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


# Resource names and IDs.
for i, name in enumerate([
    "accounts/acme",
    "accounts/acme/models/smollm2-135m",
    "accounts/acme/users/alice/apiKeys/key-1",
    "accounts/acme/deployments/chat/replicas/r1",
    "accounts/kiln/datasets/sums",
]):
    seed("resource_names", f"name{i}", name)

# Filters (first line) and orderings (second line).
seed("filters", "and", 'state=READY AND display_name="chat model"\ncreate_time desc, display_name')
seed("filters", "or", 'kind!=EMBEDDING_MODEL OR state = "UPLOADING"\nupdate_time')
seed("filters", "time", 'create_time>"2026-01-01T00:00:00Z"\nname asc')

# Page tokens (base64url of an offset and a MAC).
seed("page_tokens", "token", "AAAAAAAAAAoK2x3d8f1jT2g1bFh0cQ")
seed("page_tokens", "empty", "")

# Dataset lines: chat and completion JSONL.
chat = [{"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello", "weight": 1}]}]
seed("dataset_lines", "chat", "\n".join(json.dumps(x) for x in chat) + "\n")
seed("dataset_lines", "completion",
     "\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(3)))


# GGUF v3: a header with metadata of each kind and two small f32 tensors.
def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, kind, value):
    out = gguf_string(key) + struct.pack("<I", kind)
    if kind == 4:  # uint32
        out += struct.pack("<I", value)
    elif kind == 6:  # float32
        out += struct.pack("<f", value)
    elif kind == 8:  # string
        out += gguf_string(value)
    elif kind == 9:  # array of strings
        out += struct.pack("<IQ", 8, len(value)) + b"".join(gguf_string(v) for v in value)
    return out


kvs = [
    gguf_kv("general.architecture", 8, "llama"),
    gguf_kv("general.name", 8, "fuzz"),
    gguf_kv("llama.block_count", 4, 1),
    gguf_kv("llama.context_length", 4, 64),
    gguf_kv("llama.embedding_length", 4, 8),
    gguf_kv("llama.attention.head_count", 4, 2),
    gguf_kv("llama.attention.layer_norm_rms_epsilon", 6, 1e-5),
    gguf_kv("tokenizer.ggml.model", 8, "gpt2"),
    gguf_kv("tokenizer.ggml.tokens", 9, ["a", "b", "<s>"]),
    gguf_kv("tokenizer.chat_template", 8, "{% for m in messages %}{{ m['content'] }}{% endfor %}"),
]
tensors = [("token_embd.weight", [8, 3]), ("output_norm.weight", [8])]
header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
offset = 0
for name, dims in tensors:
    header += gguf_string(name) + struct.pack("<I", len(dims))
    header += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", 0, offset)
    count = 1
    for d in dims:
        count *= d
    offset += ((count * 4 + 31) // 32) * 32
header += b"\0" * (-len(header) % 32)
seed("gguf_header", "tiny", header + b"\0" * offset)


# ONNX: a ModelProto with one MatMul node, inputs with fixed and symbolic dimensions.
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(number, value):
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(number << 3 | 2) + varint(len(value)) + value


def value_info(name, elem_type, dims):
    shape = b"".join(field(1, field(2, d) if isinstance(d, str) else field(1, d)) for d in dims)
    tensor_type = field(1, elem_type) + field(2, shape)
    return field(1, name) + field(2, field(1, tensor_type))


node = field(1, "input_ids") + field(1, "w") + field(2, "last_hidden_state") + field(4, "MatMul")
graph = (field(1, node) + field(2, "g")
         + field(11, value_info("input_ids", 7, ["batch", "sequence"]))
         + field(11, value_info("attention_mask", 7, ["batch", "sequence"]))
         + field(12, value_info("last_hidden_state", 1, ["batch", "sequence", 384])))
model = field(1, 8) + field(7, graph) + field(8, field(1, "") + field(2, 17))
seed("onnx_header", "matmul", model)

# safetensors: an 8-byte header length, the JSON header, the data.
tensors = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight":
           {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
           "base_model.model.layers.0.self_attn.q_proj.lora_B.weight":
           {"dtype": "F32", "shape": [8, 4], "data_offsets": [128, 256]},
           "__metadata__": {"format": "pt"}}
head = json.dumps(tensors).encode()
seed("safetensors_header", "lora", struct.pack("<Q", len(head)) + head + b"\0" * 256)

# PEFT adapter configs.
seed("peft_config", "lora", json.dumps({
    "peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "accounts/kiln/models/x",
    "task_type": "CAUSAL_LM", "bias": "none"}))
seed("peft_config", "all_linear", json.dumps({
    "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear",
    "use_rslora": True, "fan_in_fan_out": False}))

# Chat templates: the template, a NUL, then `role: content` lines.
chatml = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
seed("chat_template", "chatml", chatml + "\0system: Be brief.\nuser: hi\nassistant: hello\nuser: and?")
llama = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('roles must alternate') }}{% endif %}"
         "{{ '[INST] ' + m['content'].strip() + ' [/INST]' if m['role'] == 'user' else m['content'] + eos_token }}"
         "{% endfor %}")
seed("chat_template", "alternating", llama + "\0user: hi\nassistant: yes")

# Open Inference Protocol requests: typed contents and raw bytes.
typed = oip.ModelInferRequest(model_name="m", inputs=[
    oip.ModelInferRequest.InferInputTensor(
        name="input_ids", datatype="INT64", shape=[1, 3],
        contents=oip.InferTensorContents(int64_contents=[101, 2023, 102])),
    oip.ModelInferRequest.InferInputTensor(
        name="attention_mask", datatype="INT64", shape=[1, 3],
        contents=oip.InferTensorContents(int64_contents=[1, 1, 1]))])
seed("oip_tensors", "typed", typed.SerializeToString())
raw = oip.ModelInferRequest(model_name="m", inputs=[
    oip.ModelInferRequest.InferInputTensor(name="pixels", datatype="FP32", shape=[1, 3, 2])],
    raw_input_contents=[struct.pack("<6f", *range(6))])
seed("oip_tensors", "raw", raw.SerializeToString())
