"""A real Ray Serve app on 127.0.0.1 with the shipped real model, over real HTTP."""

import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

from gear_dist.cache import use_gear_attention
from gear_dist.config import CompressionConfig, Config, EngineConfig, ModelConfig, ServeConfig
from gear_dist.engine import LLMEngine, SamplingParams
from gear_dist.models import load
from gear_dist.serve.app import build_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serve_load import run_load  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"
COMP = CompressionConfig.preset("gear", block_size=16, prefill_block_size=16, group_size=16)
ENGINE = EngineConfig(max_num_seqs=16, kv_cache_gib=0.25, max_model_len=512, max_waiting=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """One Serve instance, several apps: the main one, a locked/tiny-queue one."""
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    serve.run(build_app(Config(compression=COMP, engine=ENGINE, serve=ServeConfig(port=port))), name="main",
              route_prefix="/")
    locked = Config(compression=COMP, engine=EngineConfig(max_num_seqs=1, kv_cache_gib=0.1, max_waiting=1),
                    serve=ServeConfig(port=port, api_key="sekrit", model_id="locked"))
    serve.run(build_app(locked), name="locked", route_prefix="/locked")
    yield base
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def local_engine():
    model, tok = load(ModelConfig())
    use_gear_attention(model)
    return LLMEngine(model, tok, COMP, ENGINE)


def test_completions_and_chat_equal_the_engine(server, local_engine):
    prompt = "The three primary colors are"
    want = local_engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0].outputs[0].text
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 20,
                                                      "temperature": 0}, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 20 and usage["total_tokens"] == usage["prompt_tokens"] + 20

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text == want
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == want

    messages = [{"role": "user", "content": "Name a fruit."}]
    tok = local_engine.tokenizer
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
    want_chat = local_engine.generate([ids], SamplingParams(max_tokens=16, temperature=0.8, seed=3))[0].outputs[0].text
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0.8, seed=3)
    assert chat.choices[0].message.content == want_chat and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0.8, seed=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_chat
    assert chunks[-1].usage.completion_tokens == len(local_engine.tokenizer(want_chat, add_special_tokens=False).input_ids) \
        or chunks[-1].usage.completion_tokens > 0
    assert client.models.list().data[0].id == MODEL


def test_sse_framing(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "stream": True, "n": 2, "seed": 1,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert {c["index"] for p in payloads for c in p["choices"]} == {0, 1}
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] > 0
    finished = [c for p in payloads for c in p["choices"] if c["finish_reason"]]
    assert len(finished) == 2


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL, "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "n": 99}, 400, "n"),
    ({"model": "gpt-5", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "word " * 600, "max_tokens": 4}, 413, "prompt"),
])
def test_errors_have_openai_bodies(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_api_key_and_queue_limits(server):
    url = f"{server}/locked/v1/completions"
    body = {"model": "locked", "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    bad = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}, timeout=60)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/locked/health").status_code == 200  # health needs no key

    async def burst():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": "Bearer sekrit"}) as c:
            return await asyncio.gather(*(c.post(url, json=body) for _ in range(6)))

    statuses = [r.status_code for r in asyncio.run(burst())]
    assert 200 in statuses and 429 in statuses  # one runs, one waits, the rest are refused
    refused = next(r for r in asyncio.run(burst()) if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["type"] == "rate_limit_exceeded"


def _metric(server: str, name: str) -> float:
    for line in httpx.get(f"{server}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_disconnect_frees_the_sequence(server):
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert _metric(server, "gear_running_sequences") == 1
        assert _metric(server, "gear_kv_bytes_in_use") > 0
    for _ in range(100):  # closed mid-stream
        if _metric(server, "gear_running_sequences") == 0:
            break
        time.sleep(0.05)
    assert _metric(server, "gear_running_sequences") == 0 and _metric(server, "gear_kv_bytes_in_use") == 0
    text = httpx.get(f"{server}/metrics").text
    assert "gear_time_to_first_token_seconds_bucket" in text and 'gear_requests_total{endpoint="/v1/completions",status="200"}' in text


def test_load_sixteen_clients(server):
    res = asyncio.run(run_load(server, MODEL, concurrency=16, requests=8, max_tokens=(4, 12), prompt_words=(4, 60)))
    s = res.summary()
    assert s["requests"] == 128 and s["errors"] == 0 and s["incomplete"] == 0


def test_tp2_serves_the_same_tokens_as_tp1(server, tiny_dir):
    port = int(server.rsplit(":", 1)[1])
    texts = {}
    for tp in (1, 2):
        cfg = Config(model=ModelConfig(source="pretrained", name=tiny_dir, tp=tp, device="cpu"), compression=COMP,
                     engine=EngineConfig(max_num_seqs=4, kv_cache_gib=0.05), serve=ServeConfig(port=port, model_id="tiny"))
        serve.run(build_app(cfg), name=f"tp{tp}", route_prefix=f"/tp{tp}")
        r = httpx.post(f"{server}/tp{tp}/v1/completions", json={"model": "tiny", "prompt": "one two three",
                                                                 "max_tokens": 24, "temperature": 0, "ignore_eos": True},
                       timeout=300)
        assert r.status_code == 200, r.text
        texts[tp] = r.json()["choices"][0]["text"]
        serve.delete(f"tp{tp}")
    assert texts[1] == texts[2] and texts[1]
