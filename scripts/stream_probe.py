#!/usr/bin/env python3
"""Time to first token of streamed chat requests to OpenAI endpoints, on kept-alive connections and
on a new connection per request: shows a server whose streamed responses stall on a reused
connection (Nagle's algorithm against the client's delayed ACK, about 40 ms on Linux).

Usage: stream_probe.py URL [URL ...] [--requests 60] [--gap-ms 12] [--max-tokens 1] [--model llama]
(each URL a `.../v1/chat/completions`; run it with Dynamo's Python, `.tools/dynamo/bin/python`,
which has aiohttp, or any Python with aiohttp).
"""
import argparse
import asyncio
import json
import time

import aiohttp


async def one(session, url, k, a):
    body = {
        "model": a.model,
        "messages": [{"role": "user", "content": f"Question {k} about caching " * 40}],
        "max_tokens": a.max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    first = None
    async with session.post(url, json=body) as r:
        async for raw in r.content:
            if first is None and raw.startswith(b"data: ") and raw.strip() != b"data: [DONE]":
                for c in json.loads(raw[6:]).get("choices") or []:
                    if (c.get("delta") or {}).get("content"):
                        first = (time.perf_counter() - t0) * 1000
    return first


async def probe(url, fresh, a):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=fresh)) as s:
        tasks = []
        for k in range(a.requests):
            tasks.append(asyncio.create_task(one(s, url, k, a)))
            await asyncio.sleep(a.gap_ms / 1000)
        xs = sorted(x for x in await asyncio.gather(*tasks) if x is not None)
    n = len(xs)
    print(f"{url} {'new connection each' if fresh else 'kept alive'}: {n} requests, "
          f"TTFT P50 {xs[n // 2]:.1f} ms, P90 {xs[int(n * 0.9)]:.1f} ms, max {xs[-1]:.1f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("urls", nargs="+")
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--gap-ms", type=float, default=12.0)
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--model", default="llama")
    a = p.parse_args()
    for fresh in (False, True):
        for url in a.urls:
            asyncio.run(probe(url, fresh, a))


if __name__ == "__main__":
    main()
