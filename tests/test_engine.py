"""The engine on the real model (SmolLM2-135M, CPU): batching must not change any request."""

import asyncio

import pytest
from transformers import DynamicCache

from gear_dist.config import CompressionConfig, EngineConfig
from gear_dist.engine import LLMEngine, QueueFull, SamplingParams

PAGES = dict(block_size=16, prefill_block_size=16, group_size=16)  # several pages in short tests
CONFIGS = {"fp16": CompressionConfig.preset("fp16", **PAGES),
           "kivi8": CompressionConfig.preset("kivi", bits=8, **PAGES)}
PROMPTS = ["The history of the Roman Empire", "Photosynthesis is the process by which green plants and some "
           "other organisms use sunlight to synthesize foods from carbon dioxide and water.",
           "def fibonacci(n):", "Paris is the capital of"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def engine(real_model, comp, **kw) -> LLMEngine:
    model, tok = real_model
    return LLMEngine(model, tok, comp, EngineConfig(**{"max_num_seqs": 8, "kv_cache_gib": 0.25, "prefill_chunk": 24, **kw}))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_staggered_arrivals_equal_each_request_alone(real_model, name):
    alone = [engine(real_model, CONFIGS[name]).generate([p], GREEDY)[0].outputs[0].token_ids for p in PROMPTS]
    eng = engine(real_model, CONFIGS[name])
    ids = [eng.add_request(PROMPTS[0], GREEDY)]
    for _ in range(3):
        eng.step()
    ids.append(eng.add_request(PROMPTS[1], GREEDY))
    for _ in range(7):
        eng.step()
    ids += [eng.add_request(p, GREEDY) for p in PROMPTS[2:]]
    while not all(eng.output(i).finished for i in ids):
        eng.step()
    together = [eng.output(i).outputs[0].token_ids for i in ids]
    assert together == alone


@pytest.mark.slow
def test_engine_equals_transformers_generate(real_model):
    model, tok = real_model
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    want = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=24,
                          min_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    got = engine(real_model, CONFIGS["fp16"]).generate([PROMPTS[1]], GREEDY)[0].outputs[0].token_ids
    assert got == want


@pytest.mark.slow
def test_a_full_pool_queues_preempts_and_loses_nothing(real_model):
    eng = engine(real_model, CONFIGS["fp16"])
    alone = [o.outputs[0].token_ids for o in eng.generate(PROMPTS, GREEDY)]
    layout = eng.core.scheduler.layout
    pages = 10  # 160 tokens in pages: two or three of the eight ~60-token sequences at a time
    small = engine(real_model, CONFIGS["fp16"], kv_cache_gib=layout.nbytes(pages) / 2**30)
    assert small.core.scheduler.allocator.capacity == pages
    ids = [small.add_request(p, GREEDY) for p in PROMPTS * 2]
    small.step()
    assert small.stats().waiting > 0  # queued, not refused, not crashed
    while not all(small.output(i).finished for i in ids):
        small.step()
    outs = [small.output(i) for i in ids]
    assert [o.outputs[0].token_ids for o in outs] == alone * 2
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


@pytest.mark.slow
def test_decode_overflow_preempts_the_youngest_and_recomputes_it(real_model):
    long = SamplingParams(max_tokens=70, temperature=0.0, ignore_eos=True)
    prompts = ["Once upon a time", "In 1905, Einstein", "The mitochondria"]
    alone = [o.outputs[0].token_ids for o in engine(real_model, CONFIGS["kivi8"]).generate(prompts, long)]
    layout = engine(real_model, CONFIGS["kivi8"]).core.scheduler.layout
    small = engine(real_model, CONFIGS["kivi8"], kv_cache_gib=layout.nbytes(10) / 2**30, reserve_output=0.0)
    outs = small.generate(prompts, long)  # all three start; together they outgrow 10 pages
    assert small.core.preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == alone


@pytest.mark.slow
def test_stop_strings_stop_ids_max_tokens_and_eos(real_model):
    eng = engine(real_model, CONFIGS["kivi8"])
    base = eng.generate([PROMPTS[2]], GREEDY)[0].outputs[0]
    stop = base.text[12:16]
    cut = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[: base.text.find(stop)]
    token = base.token_ids[5]
    by_id = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[token]))[0]
    assert by_id.outputs[0].token_ids == base.token_ids[: base.token_ids.index(token)]
    assert by_id.outputs[0].finish_reason == "stop"
    short = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=5, temperature=0))[0].outputs[0]
    assert short.token_ids == base.token_ids[:5] and short.finish_reason == "length"
    chat = eng.tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                             tokenize=False)
    ended = eng.generate([chat], SamplingParams(max_tokens=200, temperature=0))[0].outputs[0]
    assert ended.finish_reason == "stop" and len(ended.token_ids) < 200  # the model's EOS ends it


@pytest.mark.slow
def test_seeds_n_and_logprobs(real_model):
    eng = engine(real_model, CONFIGS["fp16"])
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=3, logprobs=2)
    a, b = eng.generate([PROMPTS[0]], p)[0], eng.generate([PROMPTS[0]], p)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]  # reproducible
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # n samples differ (seeds seed+i)
    other = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=12, temperature=1.0, seed=8))[0]
    assert other.outputs[0].token_ids != a.outputs[1].token_ids or other.outputs[0].token_ids != a.outputs[0].token_ids
    lp = a.outputs[0].logprobs
    assert len(lp) == 12 and all(len(t.top) == 2 and t.logprob <= 0 for t in lp)
    assert a.completion_tokens == 36 and a.prompt_tokens == len(a.prompt_token_ids)


@pytest.mark.parametrize("bad, field", [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"),
                                        (dict(top_p=0), "top_p"), (dict(n=0), "n"), (dict(logprobs=21), "logprobs"),
                                        (dict(top_k=-1), "top_k"), (dict(stop=[""]), "stop")])
def test_bad_sampling_parameters_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**bad)


@pytest.mark.slow
def test_stream_grows_and_a_disconnect_frees_memory(real_model):
    eng = engine(real_model, CONFIGS["kivi8"])

    async def consume(stop_after=None):
        seen = []
        async for out in eng.stream(PROMPTS[1], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)):
            seen.append(out)
            if stop_after and len(seen) == stop_after:
                break
        return seen

    seen = asyncio.run(consume())
    lengths = [len(o.outputs[0].token_ids) for o in seen]
    assert lengths == sorted(lengths) and lengths[-1] == 20 and seen[-1].finished and len(seen) > 5
    asyncio.run(consume(stop_after=3))
    for _ in range(50):  # the engine thread frees the aborted request before its next step
        if eng.stats().running == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    stats = eng.stats()
    assert stats.running == 0 and stats.kv_bytes_in_use == 0


def test_queue_limit(real_model):
    eng = engine(real_model, CONFIGS["fp16"], max_waiting=2)
    eng.add_request("a", GREEDY)
    eng.add_request("b", GREEDY)
    with pytest.raises(QueueFull):
        eng.add_request("c", GREEDY)


def test_token_slice_equals_slicing_all_ids():
    """Steps read tokens by slice without concatenating prompt and output each time."""
    from gear_dist.engine.request import Request

    req = Request([1, 2, 3], SamplingParams())
    req.output_ids += [4, 5]
    assert req.length == 5
    for start in range(6):
        for end in range(start, 6):
            assert req.token_slice(start, end) == req.all_ids[start:end], (start, end)
