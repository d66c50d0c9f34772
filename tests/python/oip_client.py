#!/usr/bin/env python3
"""Independent Open Inference Protocol (KServe v2) gRPC client for Kiln tests.

Uses `tritonclient.grpc.InferenceServerClient`, so it exercises Kiln's gRPC
endpoint with a third-party implementation of the protocol rather than Kiln's
own client code.

Normal mode:

    python3 tests/python/oip_client.py --url 127.0.0.1:8001 \
        --model accounts/kiln/models/all-minilm-l6-v2 --api-key KEY \
        --token-ids 101,1037,2158,2003,2652,1037,2858,1012,102

calls, in order, is_server_live, is_server_ready, get_server_metadata,
is_model_ready, get_model_metadata and infer (inputs input_ids,
attention_mask = ones, token_type_ids = zeros, each INT64 [1, n]; requested
output last_hidden_state), then prints ONE JSON object on stdout:

    {"live": bool, "ready": bool, "server_name": str, "model_ready": bool,
     "model_metadata": {"name", "platform", "inputs": [{"name", "datatype",
                        "shape"}], "outputs": [...]},
     "output": {"name", "datatype", "shape": [...], "data": [flat floats],
                "encoding": "raw" | "typed"}}

("encoding" says whether the server sent the tensor in raw_output_contents or
in the typed contents field; the client accepts both.)

Error mode (--expect-error; --bad-input implies it): runs the same sequence,
and the first call that fails with InferenceServerException is reported as

    {"error_status": "<gRPC status code name, e.g. INVALID_ARGUMENT>",
     "error_message": "...", "failed_call": "<method name>"}

with exit code 0. If nothing fails in this mode, the normal JSON is printed
to stdout, a note goes to stderr, and the exit code is 3.
--bad-input sends input_ids as FP32 instead of INT64.

The API key, when given, is sent as the gRPC metadata header
`authorization: Bearer KEY` on every call.

Exit codes: 0 success, 1 unexpected error (normal mode), 2 usage error,
3 no error in --expect-error mode.
"""

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

OUTPUT_NAME = "last_hidden_state"


class CallFailed(Exception):
    def __init__(self, call, exc):
        super().__init__(str(exc))
        self.call = call
        self.exc = exc


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="host:port of the gRPC endpoint")
    p.add_argument("--model", required=True, help="model name (may contain slashes)")
    p.add_argument("--model-version", default="", help="model version (default: server's choice)")
    p.add_argument("--api-key", default=None, help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--token-ids", required=True, help="comma-separated int64 token ids")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call client timeout, seconds")
    p.add_argument("--expect-error", action="store_true",
                   help="report the first failing call as JSON instead of raising")
    p.add_argument("--bad-input", action="store_true",
                   help="send input_ids as FP32 instead of INT64 (implies --expect-error)")
    args = p.parse_args(argv)
    try:
        args.ids = [int(t) for t in args.token_ids.split(",") if t.strip() != ""]
    except ValueError:
        p.error("--token-ids must be comma-separated integers")
    if not args.ids:
        p.error("--token-ids is empty")
    if args.bad_input:
        args.expect_error = True
    return args


def status_name(exc):
    """InferenceServerException.status() is str(grpc.StatusCode.X), i.e.
    'StatusCode.INVALID_ARGUMENT'; return just 'INVALID_ARGUMENT'. Errors
    raised inside the client library itself have no status."""
    status = exc.status()
    if status is None:
        return "CLIENT_ERROR"
    return str(status).rsplit(".", 1)[-1]


def tensor_meta(t):
    return {"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]}


# Typed contents field of InferTensorContents for each datatype.
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}


def output_tensor(result, name):
    """Decode an output from either raw_output_contents (what Triton sends) or
    the typed contents field (also valid OIP v2)."""
    response = result.get_response()
    out = result.get_output(name)
    if out is None:
        raise RuntimeError(
            f"response has no output {name!r}; outputs: {[o.name for o in response.outputs]}"
        )
    shape = [int(d) for d in out.shape]
    if len(response.raw_output_contents) > 0:
        data = result.as_numpy(name)
        encoding = "raw"
    else:
        field = TYPED_FIELD.get(out.datatype)
        if field is None:
            raise RuntimeError(f"cannot decode typed contents of datatype {out.datatype}")
        data = np.asarray(list(getattr(out.contents, field))).reshape(shape)
        encoding = "typed"
    if data is None:
        raise RuntimeError(f"could not decode output {name!r}")
    expected = int(np.prod(shape)) if shape else 1
    if data.size != expected:
        raise RuntimeError(f"output {name!r}: {data.size} values for shape {shape}")
    return {
        "name": out.name,
        "datatype": out.datatype,
        "shape": shape,
        "data": [float(x) for x in np.asarray(data).reshape(-1)],
        "encoding": encoding,
    }


def run(args):
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key is not None else None
    kw = {"headers": headers, "client_timeout": args.timeout}
    client = grpcclient.InferenceServerClient(url=args.url)

    def call(name, fn, *a, **k):
        try:
            return fn(*a, **k)
        except InferenceServerException as exc:
            raise CallFailed(name, exc) from None

    try:
        out = {}
        out["live"] = bool(call("is_server_live", client.is_server_live, **kw))
        out["ready"] = bool(call("is_server_ready", client.is_server_ready, **kw))
        server_md = call("get_server_metadata", client.get_server_metadata, **kw)
        out["server_name"] = server_md.name
        out["model_ready"] = bool(call(
            "is_model_ready", client.is_model_ready, args.model, args.model_version, **kw))
        md = call("get_model_metadata", client.get_model_metadata,
                  args.model, args.model_version, **kw)
        out["model_metadata"] = {
            "name": md.name,
            "platform": md.platform,
            "inputs": [tensor_meta(t) for t in md.inputs],
            "outputs": [tensor_meta(t) for t in md.outputs],
        }

        n = len(args.ids)
        ids = np.asarray([args.ids], dtype=np.int64)
        if args.bad_input:
            ids_input = grpcclient.InferInput("input_ids", [1, n], "FP32")
            ids_input.set_data_from_numpy(ids.astype(np.float32))
        else:
            ids_input = grpcclient.InferInput("input_ids", [1, n], "INT64")
            ids_input.set_data_from_numpy(ids)
        mask_input = grpcclient.InferInput("attention_mask", [1, n], "INT64")
        mask_input.set_data_from_numpy(np.ones((1, n), dtype=np.int64))
        types_input = grpcclient.InferInput("token_type_ids", [1, n], "INT64")
        types_input.set_data_from_numpy(np.zeros((1, n), dtype=np.int64))
        requested = [grpcclient.InferRequestedOutput(OUTPUT_NAME)]

        result = call("infer", client.infer, args.model,
                      [ids_input, mask_input, types_input],
                      model_version=args.model_version, outputs=requested, **kw)
        out["output"] = output_tensor(result, OUTPUT_NAME)
        return out
    finally:
        client.close()


def main(argv=None):
    args = parse_args(argv)
    try:
        out = run(args)
    except CallFailed as failed:
        if args.expect_error:
            print(json.dumps({
                "error_status": status_name(failed.exc),
                "error_message": failed.exc.message() or "",
                "failed_call": failed.call,
            }))
            return 0
        print(f"{failed.call} failed: [{status_name(failed.exc)}] {failed.exc.message()}",
              file=sys.stderr)
        return 1
    print(json.dumps(out))
    if args.expect_error:
        print("expected an error, but every call succeeded", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
