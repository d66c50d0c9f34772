"""Plain HTTP calls against Kiln's HTTP edge (httpx, the transport both public SDKs use), in
order: each call's status, the headers a client acts on and the body. For the tests of the
edge's error answers."""

import argparse
import json

import httpx


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--calls", required=True, help="JSON list of {name, method, path, key, json | raw}")
    args = parser.parse_args()
    out = {}
    with httpx.Client(base_url=args.base_url, timeout=30) as client:
        for call in json.loads(args.calls):
            headers = {}
            if call.get("key"):
                headers["Authorization"] = f"Bearer {call['key']}"
            kwargs = {}
            if "json" in call:
                kwargs["json"] = call["json"]
            elif "raw" in call:
                kwargs["content"] = call["raw"].encode()
                headers["Content-Type"] = "application/json"
            response = client.request(call["method"], call["path"], headers=headers, **kwargs)
            try:
                body = response.json()
            except ValueError:
                body = response.text
            out[call["name"]] = {
                "status": response.status_code,
                "body": body,
                "headers": {k: response.headers.get(k) for k in
                            ["x-should-retry", "retry-after", "retry-after-ms", "allow", "content-type"]},
            }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
