"""GEAR compression math: pure torch functions on ``[..., tokens, head_dim]`` blocks (DESIGN §1)."""

from gear_dist.codec.gear import GearBlock, GearCodec, compress, decompress
from gear_dist.codec.spec import GearBlockSpec, formula_bits_per_element

__all__ = ["GearBlock", "GearBlockSpec", "GearCodec", "compress", "decompress", "formula_bits_per_element"]
