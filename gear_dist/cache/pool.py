"""Pages of KV for one layer: K and V blocks of one format, addressed by page id.

A page is one block of ``tokens`` tokens for all of a layer's KV heads: GEAR-compressed (every
page of a pool has the same :class:`GearBlockSpec`), or dense fp16 for the uncompressed
baseline. The pool is a set of tensors ``[capacity, heads, *component_shape]`` that kernels index
through a block table (as vLLM's paged KV), and its bytes are exactly ``capacity x page_nbytes``.

Pages are immutable once written ("compressed once and never again", DESIGN §1.5), so sequences
may share them (beam search): a page is freed when its last reference is released. The engine
lets all layers' pools share one :class:`PageAllocator`, so a page id means the same tokens in
every layer.
"""

from __future__ import annotations

import torch

from gear_dist.codec import GearBlock, GearBlockSpec, decompress
from gear_dist.codec.spec import KINDS
from gear_dist.config import CompressionConfig
from gear_dist.transfer import to_device


class PoolFull(RuntimeError):
    """No free page and the pool may not grow (the engine's memory budget is spent)."""


class PageAllocator:
    """Free list and reference counts of page ids."""

    def __init__(self, capacity: int = 0, growable: bool = True):
        self.refs = [0] * capacity
        self._free = list(range(capacity - 1, -1, -1))  # stack: lowest id first
        self.growable = growable
        self.on_grow: list = []  # callbacks(count) of the pools that must grow with the ids

    @property
    def capacity(self) -> int:
        return len(self.refs)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - self.free

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            if not self.growable:
                raise PoolFull(f"need {count} pages, {len(self._free)} of {self.capacity} free")
            self._grow(count - len(self._free))
        ids = [self._free.pop() for _ in range(count)]
        for i in ids:
            self.refs[i] = 1
        return ids

    def retain(self, ids: list[int]) -> None:
        for i in ids:
            self.refs[i] += 1

    def release(self, ids: list[int]) -> None:
        for i in ids:
            self.refs[i] -= 1
            if self.refs[i] == 0:
                self._free.append(i)
            elif self.refs[i] < 0:
                raise RuntimeError(f"page {i} released more often than retained")

    def _grow(self, count: int) -> None:
        """Exactly ``count`` more pages (not doubling): what is allocated stays what is used."""
        old = self.capacity
        self.refs.extend([0] * count)
        self._free.extend(range(old + count - 1, old - 1, -1))
        for grow in self.on_grow:
            grow(count)


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
        dtype: torch.dtype = torch.float16,
        allocator: PageAllocator | None = None,
    ):
        self.config, self.tokens, self.rank, self.heads, self.head_dim = config, tokens, rank, heads, head_dim
        self.device = torch.device(device)
        self.dtype = dtype  # of dense pages (the fp16 baseline); compressed pages declare their own
        if config.compressed:
            self.specs = {kind: GearBlockSpec.of(config, kind, tokens, head_dim, rank) for kind in KINDS}
            shapes = {kind: spec.shapes() for kind, spec in self.specs.items()}
        else:
            self.specs = {}
            shapes = {kind: {"dense": ((tokens, head_dim), dtype)} for kind in KINDS}
        self.alloc = allocator or PageAllocator(capacity, growable)
        count = self.alloc.capacity
        self.storage: dict[str, dict[str, torch.Tensor]] = {
            kind: {name: torch.empty((count, heads, *shape), dtype=dt, device=self.device)
                   for name, (shape, dt) in parts.items()}
            for kind, parts in shapes.items()
        }
        self.alloc.on_grow.append(self._grow)

    @property
    def capacity(self) -> int:
        return self.alloc.capacity

    @property
    def used(self) -> int:
        return self.alloc.used

    @property
    def refs(self) -> list[int]:
        return self.alloc.refs

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page: K and V of every head."""
        return sum(t.shape[1:].numel() * t.element_size() for parts in self.storage.values() for t in parts.values())

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the pool's tensors (all pages, used or free)."""
        return sum(t.numel() * t.element_size() for parts in self.storage.values() for t in parts.values())

    def allocate(self, count: int) -> torch.Tensor:
        """``count`` fresh page ids (int64 on the pool's device), each with one reference."""
        return to_device(self.alloc.allocate(count), self.device, torch.long)

    def retain(self, ids: torch.Tensor) -> None:
        self.alloc.retain(ids.flatten().tolist())

    def release(self, ids: torch.Tensor) -> None:
        self.alloc.release(ids.flatten().tolist())

    def write(self, ids: torch.Tensor, blocks: dict[str, GearBlock | torch.Tensor]) -> None:
        """Store blocks with lead dims ``[*ids.shape, heads]`` at pages ``ids``: compressed
        blocks, or for a dense pool the ``[*ids.shape, heads, tokens, d]`` tensors themselves."""
        flat = ids.flatten()
        for kind, block in blocks.items():
            parts = {"dense": block} if isinstance(block, torch.Tensor) else block.tensors()
            for name, t in parts.items():
                self.storage[kind][name][flat] = t.reshape(flat.numel(), *t.shape[ids.dim():])

    def read(self, ids: torch.Tensor) -> dict[str, GearBlock | torch.Tensor]:
        """The blocks at pages ``ids``: lead dims ``[*ids.shape, heads]`` (a gather, no decompression)."""
        flat = ids.flatten()
        out = {}
        for kind, storage in self.storage.items():
            parts = {name: t[flat].reshape(*ids.shape, *t.shape[1:]) for name, t in storage.items()}
            out[kind] = GearBlock(self.specs[kind], **parts) if self.specs else parts["dense"]
        return out

    def read_dense(self, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """K and V at pages ``ids`` as ``[*ids.shape, heads, tokens, d]`` tensors of ``dtype``."""
        return {kind: (decompress(b, dtype) if isinstance(b, GearBlock) else b.to(dtype))
                for kind, b in self.read(ids).items()}

    def _grow(self, count: int) -> None:
        for parts in self.storage.values():
            for name, t in parts.items():
                parts[name] = torch.cat([t, t.new_empty((count, *t.shape[1:]))])
