"""Triton kernels over GEAR pages (decode attention, block compression), each tested against its
torch reference.

``use_kernels(mode)`` is the one switch between the two paths: ``auto`` (default, or
``$GEAR_DIST_KERNELS``) runs the kernels on CUDA tensors and the torch reference elsewhere;
``on`` forces the kernels (on a CPU only under ``TRITON_INTERPRET=1``, as CI checks them);
``off`` forces the reference. ``launches`` counts kernel launches by name, so a run can show
which path it took.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch

from gear_dist.config import CompressionConfig

MODES = ("auto", "on", "off")
launches: Counter[str] = Counter()
_mode = os.environ.get("GEAR_DIST_KERNELS", "auto")


def use_kernels(mode: str) -> None:
    global _mode
    if mode not in MODES:
        raise ValueError(f"kernels: {mode!r} is not one of {MODES}")
    _mode = mode


@contextlib.contextmanager
def kernels_mode(mode: str):
    """Temporarily switch the path (tests, benchmarks)."""
    previous = _mode
    use_kernels(mode)
    try:
        yield
    finally:
        use_kernels(previous)


def active(device: torch.device) -> bool:
    """Whether work on ``device`` takes the kernel path."""
    if _mode == "off":
        return False
    if device.type == "cuda":
        return True
    if _mode == "on":
        from gear_dist.kernels.launch import compiling

        if os.environ.get("TRITON_INTERPRET") != "1" and not compiling():
            raise RuntimeError("kernels: 'on' for CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
        return True
    return False


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def supports(config: CompressionConfig, tokens: int, head_dim: int) -> bool:
    """Page formats the kernels take: the KIVI backbone, power-of-two page, head and group sizes,
    heads of at least 32 channels (the decode kernel reads a packed row as int32 words). Value
    groups may be of any width: each row of the decode kernel's p carries one group."""
    return (config.compressed and config.backbone == "kivi" and _pow2(tokens) and _pow2(head_dim)
            and _pow2(config.group_size) and head_dim >= 32 and tokens % config.group_size == 0
            and head_dim % config.group_size == 0)


MAX_COMPRESS_ELEMENTS = 64 * 128  # one block in registers; larger blocks (prefill pages) use torch


def supports_compress(config: CompressionConfig, tokens: int, head_dim: int) -> bool:
    """Blocks the compression kernel takes whole into registers (decode blocks: 64 x d<=128).

    NOTE: a 256 x 128 prefill page needs ~390 KB of shared memory for its dots and reductions,
    over the H100's 227 KB; those pages go through the torch codec on the GPU instead."""
    return supports(config, tokens, head_dim) and tokens * head_dim <= MAX_COMPRESS_ELEMENTS
