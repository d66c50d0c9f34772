"""The official `fireworks-ai` SDK against Kiln's HTTP edge, as a team would use it: datasets
(created and uploaded both ways, listed page by page, downloaded), a LoRA addon model whose files
go up through signed URLs, a deployment that takes addons, the addon loaded on it and chatted
with, a fine-tuning job, users and API keys, the errors it raises, and every resource deleted.
Prints what it saw as JSON for the Rust test."""

import argparse
import json
import time

import fireworks
import httpx
from fireworks import Fireworks

CHAT_LINES = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
]


def wait(what, check, timeout):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.5)


def error_of(call):
    try:
        call()
    except fireworks.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        return {"class": type(e).__name__, "status": e.status_code, "code": body.get("status"),
                "message": body.get("message"), "retry": e.response.headers.get("x-should-retry")}
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--account", required=True)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter-dir", required=True)
    args = parser.parse_args()
    fw = Fireworks(api_key=args.key, base_url=args.base_url, account_id=args.account, max_retries=0)
    out = {}
    data = "".join(json.dumps(line) + "\n" for line in CHAT_LINES).encode()

    # Datasets: one uploaded in one multipart request, one through a signed URL.
    created = fw.datasets.create(dataset_id="sums", dataset={"displayName": "Sums", "format": "CHAT", "userUploaded": {}})
    out["dataset_created"] = {"name": created.name, "state": created.state, "format": created.format}
    uploaded = fw.datasets.upload("sums", file=("sums.jsonl", data))
    out["dataset_upload"] = uploaded.model_dump() if hasattr(uploaded, "model_dump") else dict(uploaded)
    got = fw.datasets.get("sums")
    out["dataset"] = {"state": got.state, "example_count": got.example_count}

    fw.datasets.create(dataset_id="sums-signed", dataset={"displayName": "Sums again", "format": "CHAT"})
    endpoint = fw.datasets.get_upload_endpoint("sums-signed", filename_to_size={"sums.jsonl": str(len(data))})
    url = endpoint.filename_to_signed_urls["sums.jsonl"]
    # A PUT of another size, or to an altered URL, is refused; the right one is taken.
    wrong = httpx.put(url, content=data + b"\n", headers={"Content-Type": "application/octet-stream"})
    forged = httpx.put(url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB"), content=data)
    right = httpx.put(url, content=data, headers={"Content-Type": "application/octet-stream",
                                                   "X-Goog-Content-Length-Range": f"{len(data)},{len(data)}"})
    fw.datasets.validate_upload("sums-signed", body={})
    out["signed_upload"] = {"wrong_size": wrong.status_code, "forged": forged.status_code,
                            "put": right.status_code, "state": fw.datasets.get("sums-signed").state}
    download = fw.datasets.get_download_endpoint("sums")
    (name, url), = download.filename_to_signed_urls.items()
    out["download_equal"] = httpx.get(url).content == data
    out["dataset_pages"] = sorted(d.name for d in fw.datasets.list(page_size=1))

    # A LoRA addon of the base model, its files through signed URLs, validated.
    addon = fw.models.create(model_id="sums-addon", model={
        "kind": "HF_PEFT_ADDON", "displayName": "Sums addon",
        "peftDetails": {"baseModel": args.base_model, "r": 8, "targetModules": ["q_proj", "v_proj"]},
    })
    files = {}
    for file in ["adapter_config.json", "adapter_model.safetensors"]:
        with open(f"{args.adapter_dir}/{file}", "rb") as f:
            files[file] = f.read()
    endpoint = fw.models.get_upload_endpoint(
        "sums-addon", filename_to_size={k: str(len(v)) for k, v in files.items()})
    puts = [httpx.put(endpoint.filename_to_signed_urls[k], content=v,
                      headers={"Content-Type": "application/octet-stream"}).status_code
            for k, v in files.items()]
    validated = fw.models.validate_upload("sums-addon")
    model = fw.models.get("sums-addon")
    updated = fw.models.update("sums-addon", description="adds numbers")
    out["model"] = {"name": addon.name, "kind": model.kind, "state": model.state, "puts": puts,
                    "warnings": validated.warnings, "description": updated.description,
                    "display_name": updated.display_name}
    out["model_pages"] = sorted(m.name for m in fw.models.list(page_size=1))

    # A deployment that takes addons, waited for; the addon loaded on it answers.
    deployment = fw.deployments.create(
        base_model=args.base_model, deployment_id="chat", accelerator_type="CPU",
        accelerator_count=1, enable_addons=True, display_name="Chat")
    ready = wait("the deployment", lambda: (d := fw.deployments.get("chat")).state == "READY" and d, 240)
    out["deployment"] = {"name": deployment.name, "state": ready.state,
                         "replicas": ready.replica_count, "enable_addons": ready.enable_addons}
    loaded = fw.lora.load(model=addon.name, deployment=deployment.name, display_name="sums on chat")
    question = [{"role": "user", "content": "What is 2 plus 2?"}]

    def answer():
        try:
            return fw.chat.completions.create(model=loaded.name, messages=question, max_tokens=8, temperature=0)
        except fireworks.APIStatusError:
            return None
    chat = wait("the addon to answer", answer, 120)
    pieces = [c.choices[0].delta.content or "" for c in fw.chat.completions.create(
        model=loaded.name, messages=question, max_tokens=8, temperature=0, stream=True) if c.choices]
    base = fw.chat.completions.create(model=f"{args.base_model}#{deployment.name}", messages=question,
                                      max_tokens=8, temperature=0)
    out["chat"] = {"deployed_model": loaded.name, "text": chat.choices[0].message.content,
                   "streamed": "".join(pieces), "usage": chat.usage.total_tokens,
                   "base_text": base.choices[0].message.content,
                   "lora_list": [d.name for d in fw.lora.list()],
                   "lora_state": fw.lora.get(loaded.name.split("/")[-1]).state}

    # A fine-tuning job on the uploaded dataset: created, read, listed, cancelled.
    job = fw.supervised_fine_tuning_jobs.create(
        dataset="sums", supervised_fine_tuning_job_id="sums-tune", base_model=args.base_model,
        output_model="sums-tuned", epochs=1, lora_rank=4, learning_rate=0.0001)
    read = fw.supervised_fine_tuning_jobs.get("sums-tune")
    fw.supervised_fine_tuning_jobs.cancel("sums-tune", body={})
    out["job"] = {"name": job.name, "dataset": read.dataset, "base_model": read.base_model,
                  "epochs": read.epochs, "lora_rank": read.lora_rank,
                  "listed": [j.name for j in fw.supervised_fine_tuning_jobs.list()],
                  "resume": error_of(lambda: fw.supervised_fine_tuning_jobs.resume("sums-tune", body={}))}

    # Users and API keys.
    user = fw.users.create(user_id="bob", role="user", email="bob@acme.example", display_name="Bob")
    key = fw.api_keys.create(user_id="bob", api_key={"displayName": "bob's key"})
    keys = [k.key_id for k in fw.api_keys.list(user_id="bob")]
    bob = Fireworks(api_key=key.key, base_url=args.base_url, account_id=args.account, max_retries=0)
    bob_sees = [d.name for d in bob.datasets.list()]
    fw.api_keys.delete(user_id="bob", key_id=key.key_id)
    out["users"] = {"user": user.name, "role": user.role, "key_id": key.key_id, "listed": keys,
                    "bob_sees": bob_sees, "users": sorted(u.name for u in fw.users.list(page_size=1)),
                    "after_delete": error_of(lambda: bob.datasets.list())}

    # Errors.
    out["errors"] = {
        "missing": error_of(lambda: fw.datasets.get("nope")),
        "exists": error_of(lambda: fw.datasets.create(dataset_id="sums", dataset={"format": "CHAT"})),
        "bad_id": error_of(lambda: fw.models.create(model_id="Bad_ID", model={"kind": "HF_BASE_MODEL"})),
        "other_account": error_of(lambda: fw.datasets.get("sums", account_id="kiln")),
        "bad_key": error_of(lambda: Fireworks(api_key="kiln_nope", base_url=args.base_url,
                                              account_id=args.account, max_retries=0).models.list().items),
    }

    # Everything made is deleted.
    fw.lora.unload(loaded.name.split("/")[-1])
    stopped = ("JOB_STATE_CANCELLED", "JOB_STATE_FAILED", "JOB_STATE_COMPLETED")
    wait("the job to stop", lambda: fw.supervised_fine_tuning_jobs.get("sums-tune").state in stopped, 120)
    fw.supervised_fine_tuning_jobs.delete("sums-tune")
    fw.deployments.delete("chat")
    fw.models.delete("sums-addon")
    fw.datasets.delete("sums")
    fw.datasets.delete("sums-signed")
    out["after_delete"] = {
        "datasets": [d.name for d in fw.datasets.list()],
        "models": [m.name for m in fw.models.list()],
        "deployments": [d.name for d in fw.deployments.list() if d.state != "DELETED"],
    }
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
