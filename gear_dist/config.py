"""Typed configs, one dataclass per concern, mirrored 1:1 by ``conf/<group>/*.yaml``.

Every dataclass validates itself in ``__post_init__`` and raises a ``ValueError`` that names the
offending field and the allowed values, so a bad Hydra override fails at startup, not mid-run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

BITS = (2, 3, 4, 8, 16)  # 16 means "no compression" (the fp16 baseline)
BACKBONES = ("kivi", "kcvt", "uniform")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


@dataclass(frozen=True)
class CompressionConfig:
    """One GEAR configuration (DESIGN §1): backbone D, outliers S, low rank L, streaming blocks.

    ``name`` is a label for reports; the behaviour comes from the fields alone. Presets are built
    with :meth:`preset` (``gear``, ``gear_l``, ``kivi``, ``kcvt``, ``uniform``, ``fp16``).
    """

    name: str = "gear"
    bits: int = 2  # backbone bits b; 16 = keep fp16
    backbone: str = "kivi"  # how min/max groups are drawn, see codec.quant.group_tile
    group_size: int = 64  # G: tokens per key group / channels per value group (kivi)
    outlier_ratio: float = 0.02  # s: fraction of each row kept exactly, half top and half bottom
    rank: int = 2  # r for blocks compressed while decoding
    rank_prefill: int = 4  # r for the prompt's blocks
    iters: int = 3  # power-iteration passes
    oversample: int = 4  # extra power-iteration columns, dropped by Rayleigh-Ritz (codec.lowrank)
    block_size: int = 64  # n_b: tokens per streaming block (the fp16 tail holds fewer)
    prefill_block_size: int = 256  # tokens per prompt block; a multiple of block_size
    seed: int = 0  # power-iteration init, so compression is deterministic

    def __post_init__(self) -> None:
        _require(self.bits in BITS, "bits", f"{self.bits} is not one of {BITS}")
        _require(self.backbone in BACKBONES, "backbone", f"{self.backbone!r} is not one of {BACKBONES}")
        for field in ("group_size", "block_size", "prefill_block_size", "iters"):
            _require(getattr(self, field) > 0, field, f"must be positive, got {getattr(self, field)}")
        for field in ("rank", "rank_prefill", "oversample"):
            _require(getattr(self, field) >= 0, field, f"must be >= 0, got {getattr(self, field)}")
        _require(0.0 <= self.outlier_ratio < 0.5, "outlier_ratio",
                 f"must lie in [0, 0.5), got {self.outlier_ratio}")
        _require(self.prefill_block_size % self.block_size == 0, "prefill_block_size",
                 f"{self.prefill_block_size} is not a multiple of block_size={self.block_size}")
        if self.backbone == "kivi":
            _require(self.block_size % self.group_size == 0, "group_size",
                     f"{self.group_size} does not divide block_size={self.block_size} "
                     "(KIVI keys are grouped along tokens)")
        _require(self.rank <= self.block_size, "rank",
                 f"{self.rank} exceeds block_size={self.block_size}")
        _require(self.rank_prefill <= self.prefill_block_size, "rank_prefill",
                 f"{self.rank_prefill} exceeds prefill_block_size={self.prefill_block_size}")
        if self.bits == 16:
            _require(self.rank == 0 and self.rank_prefill == 0 and self.outlier_ratio == 0,
                     "bits", "16 (fp16) stores no outliers or low rank: set rank, rank_prefill "
                     "and outlier_ratio to 0")

    @property
    def compressed(self) -> bool:
        return self.bits != 16

    @property
    def method(self) -> str:
        """Which GEAR components are on: fp16, kivi (D), gear_l (D+L) or gear (D+S+L)."""
        if not self.compressed:
            return "fp16"
        has_l = self.rank > 0 or self.rank_prefill > 0
        if self.outlier_ratio > 0:
            return "gear" if has_l else "kivi_s"
        return "gear_l" if has_l else "kivi"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "CompressionConfig":
        """A named config with the paper's defaults (DESIGN §1.4), then ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"name: unknown compression preset {name!r}; choose from {sorted(PRESETS)}")
        fields = {**PRESETS[name], "name": name, **overrides}
        return cls(**fields)

    def replace(self, **changes: Any) -> "CompressionConfig":
        return dataclasses.replace(self, **changes)


_NO_EXTRAS = dict(outlier_ratio=0.0, rank=0, rank_prefill=0)
PRESETS: dict[str, dict[str, Any]] = {
    "fp16": dict(bits=16, **_NO_EXTRAS),
    "kivi": dict(backbone="kivi", **_NO_EXTRAS),
    "kcvt": dict(backbone="kcvt", **_NO_EXTRAS),
    "uniform": dict(backbone="uniform", **_NO_EXTRAS),
    "gear_l": dict(backbone="kivi", outlier_ratio=0.0),
    "gear": dict(backbone="kivi"),
}
