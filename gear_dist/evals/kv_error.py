"""KV fidelity: relative Frobenius error of compressed K and V, per layer (DESIGN §3)."""

from __future__ import annotations

import torch

from gear_dist.codec import GearCodec
from gear_dist.config import CompressionConfig

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H_kv, T, d]


@torch.no_grad()
def capture_kv(model, input_ids: torch.Tensor) -> KV:
    """Keys and values as a cache receives them (after RoPE, before any GQA repeat)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids.to(model.device), past_key_values=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    return ((approx.float() - exact).norm() / exact.norm()).item()


def blocks(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, H, T, d] -> [B, H, T // tokens, tokens, d]: whole blocks only (the rest would be the tail)."""
    b, h, t, d = x.shape
    usable = t - t % tokens
    return x[:, :, :usable].reshape(b, h, usable // tokens, tokens, d)


def kv_fidelity(kv: KV, config: CompressionConfig, block_tokens: int, *, prefill: bool = True) -> dict:
    """Compress every layer's K and V in blocks of ``block_tokens``; mean and per-layer errors.

    ``bits_per_element_k/_v`` come from the bytes the compressed blocks really hold.
    """
    if not config.compressed:
        n = len(kv)
        return dict(rel_err_k=0.0, rel_err_v=0.0, bits_per_element=16.0, rel_err_k_layers=[0.0] * n,
                    rel_err_v_layers=[0.0] * n)
    codec = GearCodec(config)
    errs: dict[str, list[float]] = {"key": [], "value": []}
    nbytes = {"key": 0, "value": 0}
    elements = 0
    for layer in kv:
        for kind, x in zip(("key", "value"), layer):
            xb = blocks(x, block_tokens)
            block = codec.compress(xb, kind, prefill=prefill)
            errs[kind].append(relative_error(block.decompress(torch.float32), xb))
            nbytes[kind] += block.nbytes
        elements += xb.numel()
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return dict(
        rel_err_k=mean(errs["key"]),
        rel_err_v=mean(errs["value"]),
        bits_per_element_k=8 * nbytes["key"] / elements,
        bits_per_element_v=8 * nbytes["value"] / elements,
        bits_per_element=8 * (nbytes["key"] + nbytes["value"]) / (2 * elements),
        rel_err_k_layers=errs["key"],
        rel_err_v_layers=errs["value"],
    )
