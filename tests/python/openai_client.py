"""The official `openai` client against Kiln's HTTP edge (`/inference/v1`): chat (plain and
streamed with stream_options.include_usage), completions (plain and streamed), embeddings
(float and base64), the model list, and the errors it raises. Prints what it got as JSON for
the Rust test to compare with the gRPC answers."""

import argparse
import json

import openai
from openai import OpenAI


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--chat-model", required=True)
    parser.add_argument("--embed-model", required=True)
    args = parser.parse_args()
    client = OpenAI(base_url=f"{args.base_url}/inference/v1", api_key=args.key, max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = {}

    chat = client.chat.completions.create(
        model=args.chat_model, messages=question, max_tokens=8, temperature=0
    )
    out["chat"] = {
        "id": chat.id,
        "text": chat.choices[0].message.content,
        "role": chat.choices[0].message.role,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    }

    pieces, ids, usage, finish, roles = [], set(), None, None, []
    stream = client.chat.completions.create(
        model=args.chat_model,
        messages=question,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {
        "text": "".join(pieces),
        "pieces": len(pieces),
        "ids": len(ids),
        "usage": usage,
        "finish_reason": finish,
        "roles": roles,
    }

    completion = client.completions.create(
        model=args.chat_model, prompt="Once upon a time", max_tokens=6, temperature=0
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=args.chat_model, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    out["completion"] = {
        "text": completion.choices[0].text,
        "streamed": streamed,
        "usage": completion.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    }

    texts = ["hello world", "the edge speaks OpenAI"]
    floats = client.embeddings.create(model=args.embed_model, input=texts, encoding_format="float")
    # With no encoding_format the client asks for base64 and decodes it itself.
    decoded = client.embeddings.create(model=args.embed_model, input=texts)
    out["embeddings"] = {
        "float": [d.embedding for d in floats.data],
        "base64": [d.embedding for d in decoded.data],
        "indexes": [d.index for d in floats.data],
        "prompt_tokens": floats.usage.prompt_tokens,
    }

    out["models"] = [m.id for m in client.models.list()]

    errors = {}
    for name, call in [
        ("unknown_model", lambda: client.chat.completions.create(
            model="accounts/kiln/models/no-such-model", messages=question, max_tokens=2)),
        ("bad_temperature", lambda: client.chat.completions.create(
            model=args.chat_model, messages=question, max_tokens=2, temperature=5)),
        ("bad_key", lambda: OpenAI(base_url=f"{args.base_url}/inference/v1", api_key="kiln_nope",
                                   max_retries=0).chat.completions.create(
            model=args.chat_model, messages=question, max_tokens=2)),
        ("stream_unknown_model", lambda: list(client.chat.completions.create(
            model="accounts/kiln/models/no-such-model", messages=question, max_tokens=2, stream=True))),
    ]:
        try:
            call()
            errors[name] = None
        except openai.APIStatusError as e:
            errors[name] = {
                "class": type(e).__name__,
                "status": e.status_code,
                "code": e.code,
                "message": e.message,
                "param": getattr(e, "param", None),
            }
    out["errors"] = errors
    print(json.dumps(out))


if __name__ == "__main__":
    main()
