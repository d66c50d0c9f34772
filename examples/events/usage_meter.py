#!/usr/bin/env python3
"""A Kiln event consumer: meters token usage per account and model from NATS JetStream.

It reads `kiln.inference.usage.recorded` events (docs/events.md) through a durable JetStream
consumer, decodes each `kiln.events.v1.Event` with Python code generated from proto/ (by
grpcio-tools, on first run), counts each event once (ids it handled are kept in a SQLite file,
so a redelivery or a replay from the start of the stream adds nothing) and acknowledges it.

    python3 -m pip install nats-py grpcio-tools
    python3 examples/events/usage_meter.py --nats nats://127.0.0.1:4222

Run against `kiln dev` on NATS (`KILN_NATS_URL=nats://127.0.0.1:4222 kiln dev`), embed or chat,
and each answer's usage is printed as it is billed. `--replay` reads the stream from its start
under a new consumer name; `--idle-exit SECONDS` stops once nothing arrived for that long and
`--json` then prints what it counted as one JSON object (the test suite runs it so).
"""

import argparse
import asyncio
import hashlib
import json
import os
import sqlite3
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"


def events_module():
    """`kiln.events.v1.events_pb2`, generated from proto/ into a cache folder keyed by the
    protos' content (so a changed contract regenerates)."""
    protos = sorted(PROTO_DIR.glob("kiln/**/*.proto"))
    digest = hashlib.sha256()
    for proto in protos:
        digest.update(proto.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    out = cache / "kiln" / "python-proto" / digest.hexdigest()[:16]
    if not (out / "kiln" / "events" / "v1" / "events_pb2.py").exists():
        from grpc_tools import protoc
        import importlib.resources

        out.mkdir(parents=True, exist_ok=True)
        well_known = str(importlib.resources.files("grpc_tools") / "_proto")
        args = ["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}"]
        args += [str(p.relative_to(PROTO_DIR)) for p in protos]
        if protoc.main(args) != 0:
            sys.exit("generating Python code from proto/ failed")
    sys.path.insert(0, str(out))
    from kiln.events.v1 import events_pb2

    return events_pb2


class Seen:
    """The ids of the events already counted, in a SQLite file."""

    def __init__(self, path):
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY)")

    def first_time(self, event_id):
        """Records `event_id`; whether it was new."""
        with self.db:
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO seen (event_id) VALUES (?)", (event_id,)
            )
        return cursor.rowcount == 1


async def meter(args):
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    events_pb2 = events_module()
    seen = Seen(args.state)
    durable = args.durable
    if args.replay:
        durable = f"{durable}-replay-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(args.nats)
    js = nc.jetstream()
    config = ConsumerConfig(
        durable_name=durable,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        filter_subject=args.subject,
    )
    sub = await js.pull_subscribe(args.subject, durable=durable, stream=args.stream, config=config)

    counted, duplicates, totals = [], 0, {}
    idle = 0.0
    while args.idle_exit is None or idle < args.idle_exit:
        try:
            messages = await sub.fetch(batch=64, timeout=1)
        except asyncio.TimeoutError:  # nats.errors.TimeoutError is one too
            idle += 1
            continue
        idle = 0.0
        for msg in messages:
            event = events_pb2.Event.FromString(msg.data)
            # JetStream dedupes within its window by this header; beyond it, by our own record.
            msg_id = (msg.headers or {}).get("Nats-Msg-Id", event.id)
            if event.WhichOneof("body") != "usage_recorded" or not seen.first_time(msg_id):
                duplicates += 1
                await msg.ack()
                continue
            usage = event.usage_recorded
            line = {
                "id": event.id,
                "time": event.time.ToJsonString(),
                "account": usage.account,
                "model": usage.model,
                "api": usage.api,
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "embedding_input_tokens": usage.embedding_input_tokens,
            }
            counted.append(line)
            key = f"{usage.account} {usage.model}"
            total = totals.setdefault(key, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0})
            total["requests"] += 1
            total["prompt_tokens"] += usage.prompt_tokens
            total["completion_tokens"] += usage.completion_tokens
            if not args.json:
                print(json.dumps(line), flush=True)
            await msg.ack()
    # The acks are on their way: flush them, then close (a drain would wait on the pull
    # subscription).
    await nc.flush()
    await nc.close()
    if args.json:
        print(json.dumps({"counted": counted, "skipped": duplicates, "totals": totals}))
    else:
        for key, total in sorted(totals.items()):
            print(f"{key}: {total}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--stream", default="KILN", help="Kiln's stream (config: nats_stream)")
    parser.add_argument("--subject", default="kiln.inference.usage.recorded")
    parser.add_argument("--durable", default="usage-meter", help="the JetStream consumer's name")
    parser.add_argument("--state", default="usage-meter.db", help="SQLite file of counted ids")
    parser.add_argument("--replay", action="store_true", help="read the stream from its start")
    parser.add_argument("--idle-exit", type=float, help="stop after this many idle seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object at exit")
    asyncio.run(meter(parser.parse_args()))


if __name__ == "__main__":
    main()
