"""Bounded load test of the OpenAI-compatible server over loopback HTTP.

C concurrent streaming clients send R requests each, with mixed prompt and output lengths;
reports throughput, TTFT and TPOT percentiles and errors, and writes
bench/results/serve-<device>-<date>.json.

    python bench/serve_load.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct
    python bench/serve_load.py --start fp16 gear -- model=llama3_8b engine.max_num_seqs=256   # starts each app
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("gear cache token layer head value key compress rank sparse outlier low quantize stream serve batch "
         "memory bandwidth kernel tensor parallel shard replica latency throughput").split()


@dataclass
class Sample:
    ok: bool
    ttft: float = float("nan")
    tpot: float = float("nan")
    tokens: int = 0
    status: int = 0
    complete: bool = False


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0

    def summary(self) -> dict:
        good = [s for s in self.samples if s.ok]
        pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
        ttft = [s.ttft for s in good]
        tpot = [s.tpot for s in good if s.tpot == s.tpot]
        tokens = sum(s.tokens for s in good)
        return dict(requests=len(self.samples), errors=len(self.samples) - len(good),
                    incomplete=sum(1 for s in good if not s.complete), tok_s=tokens / self.wall if self.wall else 0.0,
                    req_s=len(good) / self.wall if self.wall else 0.0, ttft_ms=1e3 * pct(ttft, 0.5),
                    ttft_p90_ms=1e3 * pct(ttft, 0.9), ttft_p99_ms=1e3 * pct(ttft, 0.99),
                    tpot_ms=1e3 * statistics.median(tpot) if tpot else float("nan"),
                    tpot_p90_ms=1e3 * pct(tpot, 0.9), wall_s=self.wall, tokens=tokens)


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    done = False
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Sample(ok=False, status=r.status_code)
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return Sample(ok=False, status=500)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter()
    end = time.perf_counter()
    ttft = (first or end) - t0
    tpot = (end - (first or end)) / (tokens - 1) if tokens > 1 else float("nan")
    return Sample(ok=done, ttft=ttft, tpot=tpot, tokens=tokens, status=200, complete=done and tokens == max_tokens)


async def run_load(url: str, model: str, concurrency: int, requests: int, max_tokens: tuple[int, int],
                   prompt_words: tuple[int, int], seed: int = 0) -> LoadResult:
    rng = random.Random(seed)
    jobs = [[(" ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words))), rng.randint(*max_tokens))
             for _ in range(requests)] for _ in range(concurrency)]
    result = LoadResult()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(plan):
            for prompt, n in plan:
                try:
                    result.samples.append(await one_request(client, url, model, prompt, n))
                except httpx.HTTPError:
                    result.samples.append(Sample(ok=False))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(plan) for plan in jobs))
        result.wall = time.perf_counter() - t0
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(compression: str, overrides: list[str]):
    """Start the app for conf/compression/<compression> plus Hydra ``overrides`` on a local Ray."""
    import os

    import ray
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from ray import serve

    from gear_dist.config import Config, register_configs
    from gear_dist.serve.app import build_app, model_id

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    register_configs()
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    port = _free_port()
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        config: Config = OmegaConf.to_object(compose("config", [f"compression={compression}", f"serve.port={port}",
                                                                 *overrides]))
    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name="gear_dist", route_prefix="/")
    return f"http://127.0.0.1:{port}", model_id(config), config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--start", nargs="*", default=[], help="compression configs to start and test in turn")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="per client")
    ap.add_argument("--max-tokens", type=int, nargs=2, default=(16, 64))
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(8, 256))
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for --start (after --)")
    args = ap.parse_args()

    from gear_dist import results

    rows = []
    for method in args.start or [None]:
        url, model, config = (args.url, args.model, None) if method is None else start_app(method, args.overrides)
        res = asyncio.run(run_load(url, model, args.concurrency, args.requests, tuple(args.max_tokens),
                                   tuple(args.prompt_words)))
        row = dict(method=method or "external", model=model, concurrency=args.concurrency,
                   requests_per_client=args.requests, **res.summary())
        if config is not None:
            row["tp"] = config.model.tp
            from ray import serve

            serve.shutdown()
        rows.append(row)
        print(json.dumps(row))
    result = results.record("serve", rows)
    path = results.write(result, args.out)
    print(results.markdown(rows, ["method", "concurrency", "requests", "errors", "incomplete", "tok_s", "req_s",
                                  "ttft_ms", "ttft_p90_ms", "tpot_ms", "tpot_p90_ms"]))
    print(f"wrote {path}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
