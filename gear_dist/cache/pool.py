"""Pages of compressed KV for one layer: K and V blocks of one format, addressed by page id.

A page is one compressed block of ``tokens`` tokens for all of a layer's KV heads. Every page of a
pool has the same :class:`GearBlockSpec`, so the pool is a set of dense tensors
``[capacity, heads, *component_shape]`` that kernels index through a block table (as vLLM's
paged KV), and its bytes are exactly ``capacity x heads x spec.nbytes`` per kind.

Pages are immutable once written ("compressed once and never again", DESIGN §1.5), so sequences
may share them (beam search): a page is freed when its last reference is released.
"""

from __future__ import annotations

import torch

from gear_dist.codec import GearBlock, GearBlockSpec
from gear_dist.codec.spec import KINDS
from gear_dist.config import CompressionConfig


class PoolFull(RuntimeError):
    """No free page and the pool may not grow (the engine's memory budget is spent)."""


class PagePool:
    def __init__(
        self,
        config: CompressionConfig,
        tokens: int,
        rank: int,
        heads: int,
        head_dim: int,
        device: torch.device | str,
        capacity: int = 0,
        growable: bool = True,
    ):
        self.config, self.tokens, self.rank, self.heads = config, tokens, rank, heads
        self.specs = {kind: GearBlockSpec.of(config, kind, tokens, head_dim, rank) for kind in KINDS}
        self.device = torch.device(device)
        self.growable = growable
        self.storage: dict[str, dict[str, torch.Tensor]] = {
            kind: {name: torch.empty((capacity, heads, *shape), dtype=dtype, device=self.device)
                   for name, (shape, dtype) in spec.shapes().items()}
            for kind, spec in self.specs.items()
        }
        self.refs = [0] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # stack: lowest id first

    @property
    def capacity(self) -> int:
        return len(self.refs)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page: K and V of every head."""
        return self.heads * sum(spec.nbytes for spec in self.specs.values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the pool's tensors (all pages, used or free)."""
        return sum(t.numel() * t.element_size() for parts in self.storage.values() for t in parts.values())

    def allocate(self, count: int) -> torch.Tensor:
        """``count`` fresh page ids (int64 on the pool's device), each with one reference."""
        if count > len(self._free):
            if not self.growable:
                raise PoolFull(f"need {count} pages, {len(self._free)} of {self.capacity} free")
            self._grow(count - len(self._free))
        ids = [self._free.pop() for _ in range(count)]
        for i in ids:
            self.refs[i] = 1
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def retain(self, ids: torch.Tensor) -> None:
        for i in ids.flatten().tolist():
            self.refs[i] += 1

    def release(self, ids: torch.Tensor) -> None:
        for i in ids.flatten().tolist():
            self.refs[i] -= 1
            if self.refs[i] == 0:
                self._free.append(i)
            elif self.refs[i] < 0:
                raise RuntimeError(f"page {i} released more often than retained")

    def write(self, ids: torch.Tensor, blocks: dict[str, GearBlock]) -> None:
        """Store compressed blocks with lead dims ``[*ids.shape, heads]`` at pages ``ids``."""
        flat = ids.flatten()
        for kind, block in blocks.items():
            for name, t in block.tensors().items():
                self.storage[kind][name][flat] = t.reshape(flat.numel(), *t.shape[ids.dim():])

    def read(self, ids: torch.Tensor) -> dict[str, GearBlock]:
        """The blocks at pages ``ids``: lead dims ``[*ids.shape, heads]`` (a gather, no decompression)."""
        flat = ids.flatten()
        out = {}
        for kind, spec in self.specs.items():
            parts = {name: t[flat].reshape(*ids.shape, *t.shape[1:]) for name, t in self.storage[kind].items()}
            out[kind] = GearBlock(spec, **parts)
        return out

    def _grow(self, count: int) -> None:
        """Exactly ``count`` more pages (not doubling): what is allocated stays what is used."""
        old = self.capacity
        for parts in self.storage.values():
            for name, t in parts.items():
                parts[name] = torch.cat([t, t.new_empty((count, *t.shape[1:]))])
        self.refs.extend([0] * count)
        self._free.extend(range(old + count - 1, old - 1, -1))
