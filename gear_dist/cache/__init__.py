"""GEAR KV cache: compressed pages + fp16 tail per layer, readable by transformers models."""

from gear_dist.cache.attention import register, use_gear_attention
from gear_dist.cache.hf import GEARCache
from gear_dist.cache.layer import GearLayer
from gear_dist.cache.pool import PagePool, PoolFull

__all__ = ["GEARCache", "GearLayer", "PagePool", "PoolFull", "register", "use_gear_attention"]
