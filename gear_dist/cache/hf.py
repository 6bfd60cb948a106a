"""``GEARCache``: a transformers ``Cache`` whose layers hold GEAR-compressed pages.

    from gear_dist.cache import GEARCache, use_gear_attention
    use_gear_attention(model)
    cache = GEARCache(model.config, CompressionConfig.preset("gear"))
    model.generate(**inputs, past_key_values=cache)

Works with greedy and sampled decoding, ``num_return_sequences``, beam search (pages are shared
between beams, never copied), ``crop`` and left-padded batches.
"""

from __future__ import annotations

from transformers.cache_utils import Cache

from gear_dist.cache.attention import NAME
from gear_dist.cache.layer import GearLayer
from gear_dist.config import CompressionConfig


def layer_windows(config) -> list[int | None]:
    """Per layer: the sliding window, or None for full attention (as transformers decides)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or (
        ["sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers)
    unsupported = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unsupported:
        raise NotImplementedError(f"GEARCache supports full and sliding-window attention layers, not {unsupported}")
    return [window if t == "sliding_attention" else None for t in types[: config.num_hidden_layers]]


class GEARCache(Cache):
    def __init__(self, config, compression: CompressionConfig):
        text = config.get_text_config(decoder=True)
        if getattr(text, "_attn_implementation", None) != NAME:
            raise ValueError(
                f"attn_implementation: GEARCache needs the model to use '{NAME}' attention, not "
                f"{getattr(text, '_attn_implementation', None)!r}; call gear_dist.cache.use_gear_attention(model)")
        self.compression = compression
        super().__init__(layers=[GearLayer(compression, w) for w in layer_windows(text)])

    def nbytes(self) -> int:
        """Bytes really held by all layers (pages of every pool plus fp16 tails)."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_per_layer(self) -> list[dict[str, int]]:
        return [layer.nbytes_breakdown() for layer in self.layers]
