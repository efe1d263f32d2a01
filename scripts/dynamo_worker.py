#!/usr/bin/env python3
"""A Dynamo worker in front of one vLLM-compatible engine (the emulator, or vLLM) by URL, so that
NVIDIA Dynamo's frontend and KV router can run as a peer on the same engines as kvroute.

It registers the engine's model with Dynamo's runtime (token input: Dynamo's frontend applies the
chat template and tokenizes), relays the engine's KV cache events (vLLM's ZMQ feed,
`--kv-events-config`) to Dynamo's KV router with Dynamo's own `KvEventPublisher`, and forwards each
request to the engine's `/v1/completions` as token ids, streaming one output token per chunk back.
Dynamo's own vLLM worker runs vLLM in-process; this one reaches the engine over HTTP instead, which
adds a local hop per request to the Dynamo rows (the SMG rows have the same kind of hop).

Discovery, request and event planes are Dynamo's file, TCP and ZMQ ones (`DYN_FILE_KV` names the
discovery directory): no etcd or NATS. Started by kvroute-harness (`peer::Dynamo`); prints
`worker ready` on stdout once registered.
"""
import argparse
import asyncio
import json
import os
import sys

import aiohttp
import uvloop
from dynamo.llm import KvEventPublisher, ModelInput, ModelType, WorkerType, register_model
from dynamo.runtime import DistributedRuntime

# The token id streamed back per generated token: the engine streams text, and only the count of
# tokens matters to the measurements (the emulator's text is filler).
FILLER_TOKEN = 1000


class Engine:
    """Forwards Dynamo's pre-processed requests to one engine's OpenAI completions API."""

    def __init__(self, url, model):
        self.url = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.session = None

    async def generate(self, request, context=None):
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        stop = request.get("stop_conditions") or {}
        body = {
            "model": self.model,
            "prompt": request["token_ids"],
            "max_tokens": stop.get("max_tokens") or 16,
            "min_tokens": stop.get("min_tokens") or 0,
            "ignore_eos": bool(stop.get("ignore_eos")),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with self.session.post(self.url, json=body) as r:
            if r.status != 200:
                text = await r.text()
                yield {"token_ids": [], "finish_reason": "error: " + text[:200]}
                return
            finish, usage, pending = None, None, b""
            # Whatever has arrived is relayed as one message: tokens that queued up while the
            # previous message was sent go together (the first token alone, as soon as it comes).
            async for data in r.content.iter_any():
                pending += data
                *lines, pending = pending.split(b"\n")
                tokens = 0
                for raw in lines:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        tokens += bool(choice.get("text"))
                        finish = choice.get("finish_reason") or finish
                if tokens:
                    yield {"index": 0, "token_ids": [FILLER_TOKEN] * tokens}
            out = {"index": 0, "token_ids": [], "finish_reason": finish or "length"}
            if usage:
                out["completion_usage"] = {
                    k: usage.get(k)
                    for k in ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details")
                }
            yield out


async def main(a):
    runtime = DistributedRuntime(asyncio.get_running_loop(), "file", "tcp", event_plane="zmq")
    endpoint = runtime.endpoint(f"{a.namespace}.backend.generate")
    # Kept referenced for the worker's life: dropping it stops the relay.
    events = KvEventPublisher(
        endpoint=endpoint, kv_block_size=a.block_size, zmq_endpoint=a.kv_events, zmq_topic=a.topic
    )
    await register_model(
        ModelInput.Tokens,
        ModelType.Chat | ModelType.Completions,
        endpoint,
        a.model_path,
        a.model,
        worker_type=WorkerType.Aggregated,
        kv_cache_block_size=a.block_size,
    )
    engine = Engine(a.engine, a.model)
    print("worker ready", flush=True)
    # Nothing more on stdout: the harness stops reading it.
    sys.stdout = open(os.devnull, "w")
    await endpoint.serve_endpoint(engine.generate)
    del events


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="the engine's base URL (http://host:port)")
    p.add_argument("--kv-events", required=True, help="the engine's KV events endpoint (tcp://host:port)")
    p.add_argument("--topic", default="", help="the events' topic (vLLM's default: none)")
    p.add_argument("--model", required=True, help="the model name the engine serves and Dynamo registers")
    p.add_argument("--model-path", required=True, help="tokenizer and chat template (bootstrap: .tools/dynamo/model)")
    p.add_argument("--namespace", default="dynamo")
    p.add_argument("--block-size", type=int, default=16)
    uvloop.run(main(p.parse_args()))
