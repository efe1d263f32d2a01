"""The emulator's KV cache events (`--kv-events-config`) seen by a real ZeroMQ subscriber (pyzmq, the
libzmq binding vLLM publishes with), decoded strictly with msgspec (the library vLLM encodes them
with) against vLLM 0.33's event schema, as shared/reference/vllm_kv_event_wire_examples.txt shows it.
"""
import json
import os
import subprocess
import time
import urllib.request

import msgspec
import pytest
import zmq

from conftest import emulator_binary


class BlockStored(msgspec.Struct, tag=True):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag=True):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag=True):
    pass


class KVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


DECODER = msgspec.msgpack.Decoder(KVEventBatch)
BEGIN_OF_TEXT = 128000


@pytest.fixture(scope="module", params=["bytes", "int"])
def publishing_emulator(request):
    """An emulator with 48 KV blocks (so a few long prompts evict) publishing on a free port; its
    block hashes as bytes (vLLM 0.33's default) or, with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1, as
    integers."""
    config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": "tcp://127.0.0.1:0",
        "topic": "kv",
    }
    proc = subprocess.Popen(
        [emulator_binary(), "--port", "0", "--time-scale", "50", "--served-model-name", "llama",
         "--num-gpu-blocks-override", "48", "--kv-events-config", json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "1" if request.param == "int" else "0"},
    )
    try:
        events_line = proc.stdout.readline()
        assert events_line.startswith("kv events on tcp://"), events_line
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield "http://" + line.split()[-1], events_line.split()[-1], request.param
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def post(url, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def chat(base, system, user):
    r = post(base + "/v1/chat/completions", {
        "model": "llama",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 8,
        "ignore_eos": True,
    })
    return r["usage"]


def drain(sub, quiet_s=1.0):
    """Every message until none arrives for `quiet_s`."""
    out = []
    while sub.poll(int(quiet_s * 1000)):
        out.append(sub.recv_multipart())
    return out


def test_kv_events_follow_the_cache(publishing_emulator):
    base, endpoint, hashes = publishing_emulator
    kind = bytes if hashes == "bytes" else int
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(endpoint)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    time.sleep(0.5)  # a SUB socket misses what is published before it has joined

    doc = "The prefix cache keeps every full block of a prompt. " * 12
    first = chat(base, doc, "What does it keep?")
    again = chat(base, doc, "What does it keep?")
    assert again["prompt_tokens_details"]["cached_tokens"] > 0
    messages = drain(sub)
    # Distinct long prompts fill the 48 blocks and evict the document's.
    for i in range(6):
        chat(base, f"Unrelated context number {i}. " * 30, "Summarize.")
    messages += drain(sub)
    post(base + "/reset_prefix_cache")
    messages += drain(sub)

    assert messages, "no KV events received"
    held, seen, removed, cleared = {}, set(), 0, False
    for n, frames in enumerate(messages):
        assert len(frames) == 3, frames
        topic, seq, payload = frames
        assert topic == b"kv"
        assert int.from_bytes(seq, "big") == n, "sequence numbers count batches from 0, without gaps"
        batch = DECODER.decode(payload)
        assert batch.data_parallel_rank == 0 and batch.ts > 1.6e9
        for ev in batch.events:
            assert not cleared, "the reset is the last change"
            if isinstance(ev, BlockStored):
                assert ev.block_size == 16 and ev.medium == "GPU"
                assert len(ev.token_ids) == 16 * len(ev.block_hashes)
                # A run of blocks continues a chain already published, or starts a prompt.
                assert ev.parent_block_hash is None or ev.parent_block_hash in seen
                if ev.parent_block_hash is None:
                    assert ev.token_ids[0] == BEGIN_OF_TEXT
                for h in ev.block_hashes:
                    assert isinstance(h, kind) and (kind is int or len(h) == 8), h
                    seen.add(h)
                    held[h] = held.get(h, 0) + 1
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    assert held.get(h, 0) > 0, "only a stored block is removed"
                    held[h] -= 1
                    removed += 1
            else:
                cleared = True
    assert removed > 0, "48 blocks cannot hold every prompt: some were evicted"
    assert cleared
    # The first request stored its prompt's full blocks (and output blocks as they filled).
    assert len(seen) >= first["prompt_tokens"] // 16


def test_no_events_without_the_flag(emulator):
    stats = json.loads(urllib.request.urlopen(emulator + "/emulator/stats", timeout=10).read())
    assert stats["kv_events_dropped"] is None
