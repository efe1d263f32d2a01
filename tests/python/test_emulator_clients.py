"""The emulator seen by real clients: the official `openai` Python client, and the official
Prometheus Python client's text-format parser (the library vLLM itself exposes metrics with)."""
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused")


def test_openai_client_streams_chat(emulator):
    stream = client(emulator).chat.completions.create(
        model="llama",
        messages=[{"role": "user", "content": "Tell me about prefix caching."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "length"
    assert usage.completion_tokens == 12
    assert usage.prompt_tokens > 10
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert len(text.split()) >= 10


def test_openai_client_sees_cached_tokens(emulator):
    c = client(emulator)
    messages = [{"role": "system", "content": "You are terse. " * 40}, {"role": "user", "content": "Hi"}]
    first = c.chat.completions.create(model="llama", messages=messages, max_tokens=2)
    second = c.chat.completions.create(model="llama", messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    full_blocks = (second.usage.prompt_tokens - 1) // 16 * 16
    assert second.usage.prompt_tokens_details.cached_tokens == full_blocks
    assert second.choices[0].message.role == "assistant"


def test_openai_client_completions_and_models(emulator):
    c = client(emulator)
    r = c.completions.create(model="llama", prompt="Once upon a time", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].text
    streamed = "".join(
        ch.choices[0].text for ch in c.completions.create(model="llama", prompt="Once", max_tokens=3, stream=True) if ch.choices
    )
    assert streamed
    assert [m.id for m in c.models.list()] == ["llama"]


def test_openai_client_gets_vllm_errors(emulator):
    c = client(emulator)
    try:
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected NotFoundError")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and "does not exist" in str(e)
    try:
        c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=0)
        raise AssertionError("expected BadRequestError")
    except openai.BadRequestError as e:
        assert e.status_code == 400


def test_metrics_page_parses_with_prometheus_client(emulator):
    client(emulator).completions.create(model="llama", prompt="warm up", max_tokens=2)
    page = urllib.request.urlopen(emulator + "/metrics").read().decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    expected = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_prefill_kv_computed_tokens": "histogram",
        "vllm:cache_config_info": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
        for s in families[name].samples:
            assert s.labels.get("model_name") == "llama" and s.labels.get("engine") == "0", s
    info = families["vllm:cache_config_info"].samples[0].labels
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) == 711
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert {"stop", "length", "abort"} <= reasons
