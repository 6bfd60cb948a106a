"""GEARCache inside transformers' generate(), against DynamicCache, on tiny random models."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from gear_dist.cache import GEARCache, GearLayer, use_gear_attention
from gear_dist.codec.spec import formula_bits_per_element
from gear_dist.config import CompressionConfig
from gear_dist.models import random_config

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=256)
ARCHS = {  # GQA, a single KV head, head dims 64-256, sliding-window layers
    "llama3-8b": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "mistral-7b": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=128, sliding_window=48),
    "qwen2-7b": dict(num_attention_heads=2, num_key_value_heads=2, head_dim=64),
    "gemma3-4b": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=48,
                      num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}
SMALL_BLOCKS = dict(block_size=16, prefill_block_size=32, group_size=16)  # several pages within a short test


def tiny_model(arch: str = "llama3-8b", dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(random_config(arch, **{**TINY, **ARCHS[arch], **overrides}), dtype=dtype)
    use_gear_attention(model)
    return model.eval()


def left_padded(batch: int = 3, length: int = 40, vocab: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : 7 * b] = 0  # unequal lengths
        ids[b, : 7 * b] = 0
    return dict(input_ids=ids, attention_mask=mask)


def generate(model, cache, inputs, **kw):
    kw = {"max_new_tokens": 48, "do_sample": False, "pad_token_id": 0, **kw}
    return model.generate(**inputs, past_key_values=cache, **kw)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fp16_gear_cache_equals_dynamic_cache(arch):
    model, inputs = tiny_model(arch), left_padded()
    want = generate(model, DynamicCache(config=model.config), inputs)
    got = generate(model, GEARCache(model.config, CompressionConfig.preset("fp16")), inputs)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compressed_cache_generates_and_compresses(arch):
    model, inputs = tiny_model(arch), left_padded()
    cfg = CompressionConfig.preset("gear", **SMALL_BLOCKS)
    cache = GEARCache(model.config, cfg)
    out = generate(model, cache, inputs)
    assert out.shape == (3, 40 + 48)
    total = 40 + 48 - 1  # the last sampled token is never fed back
    for layer in cache.layers:
        assert layer.get_seq_length() == total
        assert layer.tail_k.shape[-2] < cfg.block_size  # everything else is compressed
        if layer.is_sliding:  # keeps only what the window sees, in whole pages
            assert layer.held < layer.sliding_window + cfg.prefill_block_size
            assert layer.offset > 0
        else:
            assert layer.held == total and sum(s.tokens for s in layer.segments) + layer.tail_k.shape[-2] == total


SEARCHES = [dict(num_beams=4, num_return_sequences=2), dict(do_sample=True, num_return_sequences=3, top_k=20)]


@pytest.mark.parametrize("kw", SEARCHES, ids=["beam4", "sample3"])
def test_beam_search_and_sampling_match_dynamic_cache(kw):
    model, inputs = tiny_model(), left_padded()
    torch.manual_seed(1)
    want = generate(model, DynamicCache(config=model.config), inputs, **kw)
    torch.manual_seed(1)
    got = generate(model, GEARCache(model.config, CompressionConfig.preset("fp16")), inputs, **kw)
    assert torch.equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("kw", SEARCHES, ids=["beam4", "sample3"])
def test_eight_bit_agrees_with_dynamic_cache_on_the_real_model(real_model, kw):
    """Random tiny models have near-flat logits, so agreement is measured on SmolLM2."""
    model, tok = real_model
    prompts = ["The history of the Roman Empire", "Photosynthesis is the process by which plants"]
    inputs = dict(tok(prompts, return_tensors="pt", padding=True, padding_side="left"))
    n = inputs["input_ids"].shape[1]
    kw = {**kw, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(1)
    want = generate(model, DynamicCache(config=model.config), inputs, **kw)
    torch.manual_seed(1)
    got = generate(model, GEARCache(model.config, CompressionConfig.preset("kivi", bits=8, **SMALL_BLOCKS)),
                   inputs, **kw)
    agree = (got[:, n:] == want[:, n:]).float().mean().item()
    assert agree >= 0.95, agree


def test_padding_content_never_reaches_real_tokens():
    """Whatever sits in the padding (token ids, hence K/V) must not change any real sequence."""
    model = tiny_model()
    cfg = CompressionConfig.preset("gear", **SMALL_BLOCKS)
    a = left_padded()
    b = {k: v.clone() for k, v in a.items()}
    b["input_ids"][b["attention_mask"] == 0] = 123
    out_a = generate(model, GEARCache(model.config, cfg), a)
    out_b = generate(model, GEARCache(model.config, cfg), b)
    assert torch.equal(out_a[:, 40:], out_b[:, 40:])


def _filled_layer(cfg: CompressionConfig, batch: int, heads: int, tokens: int, d: int, dtype=torch.float16):
    layer = GearLayer(cfg)
    k, v = torch.randn(batch, heads, tokens, d, dtype=dtype), torch.randn(batch, heads, tokens, d, dtype=dtype)
    layer.update(k, v)
    layer.commit(None)
    return layer, k, v


def test_reorder_then_decompress_equals_decompress_then_reorder(seed):
    cfg = CompressionConfig.preset("gear", **SMALL_BLOCKS)
    layer, _, _ = _filled_layer(cfg, batch=4, heads=2, tokens=90, d=64)
    before = layer.materialize()
    order = torch.tensor([3, 3, 0, 1])
    layer.reorder_cache(order)
    after = layer.materialize()
    for x, y in zip(before, after):
        assert torch.equal(y, x.index_select(0, order))
    # pages are shared, not copied, and freed with their last user: 90 tokens = 2 prefill pages
    # per sequence; sequence 2's are free now, sequence 3's have two users
    pool = layer.pools[layer.pool_of["prefill"]]
    assert pool.capacity == 8 and pool.used == 6 and max(pool.refs) == 2
    layer.batch_select_indices(torch.tensor([2]))  # keeps what was sequence 0
    assert pool.used == 2 and max(pool.refs) == 1


def _storage_bytes(layer: GearLayer) -> int:
    """Bytes of the distinct storages behind every tensor the layer holds (views count in full)."""
    tensors = [layer.tail_k, layer.tail_v, layer.tail_valid]
    tensors += [t for pool in layer.pools.values() for parts in pool.storage.values() for t in parts.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_nbytes_is_allocated_and_matches_formula_at_4096_tokens():
    cfg = CompressionConfig.preset("gear")
    b, h, n, d = 1, 8, 4096, 128
    layer, _, _ = _filled_layer(cfg, b, h, n, d)
    assert layer.nbytes() == _storage_bytes(layer)
    bits = sum(formula_bits_per_element(cfg, kind, cfg.prefill_block_size, d, cfg.rank_prefill)
               for kind in ("key", "value"))
    formula = bits / 8 * b * h * n * d
    assert math.isclose(layer.nbytes(), formula, rel_tol=0.01), (layer.nbytes(), formula)
    fp16 = 2 * b * h * n * d * 2
    assert layer.nbytes() <= 0.30 * fp16


def test_decode_streaming_compresses_each_block_once(seed):
    cfg = CompressionConfig.preset("gear", **SMALL_BLOCKS)
    layer, k, v = _filled_layer(cfg, 2, 2, 40, 64)  # one prefill page (32) + tail 8
    pages_before = [s.ids.clone() for s in layer.segments]
    first = layer.pools[layer.pool_of["prefill"]].read(layer.segments[0].ids)["key"].codes.clone()
    for step in range(40):  # decode one token at a time
        layer.update(torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64))
        layer.commit(None)
        assert layer.tail_k.shape[-2] < cfg.block_size
    assert [s.tokens for s in layer.segments] == [32, 16, 16, 16]
    assert torch.equal(layer.segments[0].ids, pages_before[0])
    assert torch.equal(layer.pools[layer.pool_of["prefill"]].read(layer.segments[0].ids)["key"].codes, first)  # never touched again


def test_crop_then_continue_matches_dynamic_cache():
    model, inputs = tiny_model(), left_padded()
    outs = {}
    for name, cache in {"dyn": DynamicCache(config=model.config),
                        "gear": GEARCache(model.config, CompressionConfig.preset("fp16"))}.items():
        out = generate(model, cache, inputs, max_new_tokens=20)
        cache.crop(-5)  # roll back, as speculative decoding does
        assert cache.get_seq_length() == 40 + 20 - 1 - 5
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, 20, dtype=torch.long)], dim=1)
        outs[name] = generate(model, cache, {"input_ids": out[:, :55], "attention_mask": mask[:, :55]},
                              max_new_tokens=10)
    assert torch.equal(outs["gear"], outs["dyn"])


def test_crop_inside_compressed_pages(seed):
    cfg = CompressionConfig.preset("kivi", bits=8, **SMALL_BLOCKS)
    layer, k, _ = _filled_layer(cfg, 1, 2, 100, 64)  # pages: 32, 32, 32, tail 4
    layer.crop(-40)  # cuts into the second prefill page
    keys, _ = layer.materialize()
    assert layer.get_seq_length() == 60 and keys.shape[-2] == 60
    torch.testing.assert_close(keys, k[..., :60, :], atol=0.05, rtol=0.05)
    assert sum(s.tokens for s in layer.segments) == 32 and layer.tail_k.shape[-2] == 28
    layer.crop(50)  # the pre-5.18 convention: keep 50
    assert layer.get_seq_length() == 50


def test_requires_gear_attention():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation: GEARCache needs"):
        GEARCache(model.config, CompressionConfig.preset("gear"))
    use_gear_attention(model)
    cache = GEARCache(model.config, CompressionConfig.preset("gear"))
    model.set_attn_implementation("sdpa")  # switched behind the cache's back
    with pytest.raises(RuntimeError, match="'gear' attention"):
        generate(model, cache, left_padded(), max_new_tokens=3)


def test_dynamic_cache_still_works_under_gear_attention():
    model, inputs = tiny_model(), left_padded()
    want = generate(model, DynamicCache(config=model.config), inputs)
    model.set_attn_implementation("sdpa")
    assert torch.equal(generate(model, DynamicCache(config=model.config), inputs), want)
