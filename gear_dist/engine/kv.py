"""The engine's KV memory and the per-step view a transformers model attends through.

Memory: for every layer a page pool of ``block_size``-token pages (GEAR-compressed, or dense fp16
for the baseline), all sharing one :class:`PageAllocator` so a page id names the same tokens in
every layer, plus one fp16 tail row per running sequence (fewer than ``block_size`` tokens).
The budget is counted in bytes: pages x bytes per page + tail rows.

A step hands the model an :class:`EngineCache` (a transformers ``Cache``) whose layers tag the
step's K/V with a :class:`StepLayer`; the ``gear`` attention implementation then calls
``StepLayer.attend``, which reads pages + tail + the step's tokens, and stores the step's tokens:
full blocks into the pages the scheduler allocated, the rest into the tail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from gear_dist import kernels
from gear_dist.cache.pool import PageAllocator, PagePool
from gear_dist.codec import compress
from gear_dist.config import CompressionConfig, EngineConfig
from gear_dist.transfer import to_device

logger = logging.getLogger(__name__)


def model_geometry(model_config) -> tuple[int, int, int, int]:
    """(layers, KV heads, head dim, query heads) of a transformers config."""
    text = model_config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, getattr(text, "num_key_value_heads", heads), head_dim, heads


@dataclass(frozen=True)
class KVLayout:
    """Sizes of the engine's KV memory, without any tensor: what the scheduler (which may live in
    another process than the shards) needs to count pages and bytes."""

    layers: int
    heads: int  # KV heads this process holds (a tensor-parallel rank: num_kv_heads / tp)
    head_dim: int
    block: int  # tokens per page
    slots: int  # fp16 tail rows (= max_num_seqs)
    itemsize: int  # bytes of the model dtype (tails, dense pages)
    page_bytes: int  # one page id across all layers
    tail_bytes: int  # all tail rows across all layers

    @classmethod
    def of(cls, model_config, compression: CompressionConfig, engine: EngineConfig, dtype: torch.dtype,
           tp: int = 1) -> "KVLayout":
        if compression.prefill_block_size != compression.block_size or compression.rank_prefill != compression.rank:
            raise ValueError("prefill_block_size: the engine keeps every page in one format; set prefill_block_size "
                             f"= block_size ({compression.block_size}) and rank_prefill = rank ({compression.rank})")
        layers, kv_heads, head_dim, _ = model_geometry(model_config)
        heads = kv_heads // tp
        block = compression.block_size
        itemsize = torch.tensor([], dtype=dtype).element_size()
        probe = PagePool(compression, block, compression.rank, heads, head_dim, "meta", dtype=dtype)
        return cls(layers, heads, head_dim, block, engine.max_num_seqs, itemsize, layers * probe.page_nbytes,
                   layers * 2 * engine.max_num_seqs * heads * block * head_dim * itemsize)

    def pages_for(self, budget_bytes: int) -> int:
        pages = (budget_bytes - self.tail_bytes) // self.page_bytes
        if pages < 1:
            raise ValueError(f"kv_cache_gib: a budget of {budget_bytes / 2**30:.3f} GiB does not hold the "
                             f"{self.tail_bytes / 2**30:.3f} GiB of tails plus one page")
        return pages

    def capacity_tokens(self, pages: int) -> int:
        return pages * self.block + self.slots * (self.block - 1)

    def nbytes(self, pages: int) -> int:
        return pages * self.page_bytes + self.tail_bytes

    def bytes_in_use(self, pages: int, tail_tokens: int) -> int:
        return pages * self.page_bytes + self.layers * 2 * self.heads * self.head_dim * self.itemsize * tail_tokens

    def fp16_bytes(self, tokens: int) -> int:
        """What ``tokens`` tokens take in a dense fp16 cache (the compression ratio's numerator)."""
        return self.layers * 2 * self.heads * self.head_dim * 2 * tokens


class KVStore:
    """The tensors: a page pool per layer (``pages`` of them) and the fp16 tail rows. Which page
    and row a sequence uses is the scheduler's business; the store only reads and writes."""

    def __init__(self, layout: KVLayout, compression: CompressionConfig, pages: int, dtype: torch.dtype,
                 device: torch.device):
        self.layout, self.compression = layout, compression
        self.layers, self.heads, self.head_dim, self.block = layout.layers, layout.heads, layout.head_dim, layout.block
        self.dtype, self.device = dtype, torch.device(device)
        self.pools = [PagePool(compression, self.block, compression.rank, self.heads, self.head_dim, device,
                               dtype=dtype, allocator=PageAllocator(pages, growable=False)) for _ in range(self.layers)]
        self.tail_k = [torch.zeros(layout.slots, self.heads, self.block, self.head_dim, dtype=dtype, device=device)
                       for _ in range(self.layers)]
        self.tail_v = [torch.zeros_like(t) for t in self.tail_k]

    def nbytes(self) -> int:
        """Bytes the store really holds: every pool's pages plus the fp16 tails."""
        return sum(p.nbytes for p in self.pools) + sum(t.numel() * t.element_size() for t in self.tail_k + self.tail_v)


@dataclass
class SeqStep:
    """One sequence's part of a step: its tokens [start, end) and the pages it fills."""

    pages: list[int]  # all its pages after this step (the last ``new_pages`` are filled now)
    new_pages: int
    slot: int
    start: int  # tokens already stored (pages * block + tail)
    end: int


@dataclass
class DecodeBatch:
    """Where a decode step's sequences live, as device tensors built once per step (not per layer),
    with what the decode kernel reads besides the pages (the same in every layer)."""

    rows: torch.Tensor  # [B] tail row
    cols: torch.Tensor  # [B] position of the new token in its tail
    table: torch.Tensor  # [B, width] int32 pages written before this step (padded with a valid id)
    npages: torch.Tensor  # [B] int32
    width: int
    filled_rows: torch.Tensor | None  # tail rows this step fills (None: none), each compressed into ...
    filled_pages: torch.Tensor | None  # ... its sequence's newest page
    _view: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, seqs: list[SeqStep], block: int, device: torch.device) -> "DecodeBatch":
        full = [s.pages[: s.start // block] for s in seqs]
        width = max(map(len, full))
        padded = [p + [p[0] if p else 0] * (width - len(p)) for p in full]
        filled = [s for s in seqs if s.new_pages]
        return cls(to_device([s.slot for s in seqs], device), to_device([s.start % block for s in seqs], device),
                   to_device(padded, device, torch.int32).reshape(len(seqs), width),
                   to_device([len(p) for p in full], device, torch.int32), width,
                   to_device([s.slot for s in filled], device) if filled else None,
                   to_device([s.pages[-1] for s in filled], device) if filled else None)

    def kernel_view(self, block: int) -> tuple[torch.Tensor, ...]:
        """(table, page positions, tail lengths, tail positions, valid-from, tail rows) for
        :class:`PagedKV`; made on the first layer's call and reused by the others."""
        if self._view is None:
            b = self.rows.shape[0]
            table = self.table if self.width else self.table.new_zeros(b, 1)
            pos = (torch.arange(table.shape[1], dtype=torch.int32, device=table.device) * block).expand(b, -1)
            self._view = (table, pos.contiguous(), (self.cols + 1).int(), self.npages * block,
                          torch.zeros_like(self.npages), self.rows.int())  # pos: read with table's strides
        return self._view


class StepLayer(CacheLayerMixin):
    """One layer's view of a step; the ``gear`` attention finds it through the K/V tag."""

    is_compileable = False
    is_sliding = False

    def __init__(self, store: KVStore, layer: int, seqs: list[SeqStep], batch: DecodeBatch | None):
        super().__init__()
        self.store, self.layer, self.seqs, self.batch = store, layer, seqs, batch
        self.decode = batch is not None
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return query_length, 0  # the mask is not used: attend() knows every sequence's extent

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.new_k, self.new_v = key_states, value_states  # [B, H, T, d]
        key_states, value_states = key_states.clone(), value_states.clone()
        key_states.gear_layer = value_states.gear_layer = self
        return key_states, value_states

    # -- attention --------------------------------------------------------------------------------
    def attend(self, module, query: torch.Tensor, attention_mask, dropout: float, scaling: float | None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if self.decode:
            out = self._decode(query, scale)[:, None]  # [B, 1, Hq, D]
        else:
            out = self._prefill(query, scale).transpose(1, 2)  # [1, T, Hq, D]
        self._store()
        return out, None

    def _segments(self) -> list[tuple[SeqStep, slice]]:
        """Each prefill chunk's columns in the packed row."""
        out, at = [], 0
        for seq in self.seqs:
            out.append((seq, slice(at, at + seq.end - seq.start)))
            at += seq.end - seq.start
        return out

    def _prefill(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Packed chunks ([1, H, sum T, d]): each attends its own pages + tail + itself, causally."""
        outs = []
        for seq, cols in self._segments():
            keys, values = self._history(seq)
            k = torch.cat([keys, self.new_k[0, :, cols]], dim=1)[None]
            v = torch.cat([values, self.new_v[0, :, cols]], dim=1)[None]
            qpos = torch.arange(seq.start, seq.end, device=query.device)
            mask = torch.arange(seq.end, device=query.device)[None, :] <= qpos[:, None]
            outs.append(torch.nn.functional.scaled_dot_product_attention(query[:, :, cols], k, v, attn_mask=mask,
                                                                         scale=scale, enable_gqa=True))
        return torch.cat(outs, dim=2)

    def _decode(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """One new token per sequence over pages + tail (new token written into the tail first)."""
        store, layer, bt = self.store, self.layer, self.batch
        store.tail_k[layer][bt.rows, :, bt.cols] = self.new_k[:, :, 0]
        store.tail_v[layer][bt.rows, :, bt.cols] = self.new_v[:, :, 0]
        q = query[:, :, 0]
        if (kernels.active(query.device) and store.compression.compressed
                and kernels.supports(store.compression, store.block, store.head_dim)):
            from gear_dist.kernels.decode_attention import PagedKV, gear_decode_attention

            kernels.launches["decode_attention"] += 1
            table, pos, tail_len, tail_pos, valid_from, rows = bt.kernel_view(store.block)
            kv = PagedKV([(store.pools[layer], table, pos, bt.npages)], store.tail_k[layer], store.tail_v[layer],
                         tail_len, tail_pos, valid_from, rows)
            return gear_decode_attention(q, kv, scale)
        return self._decode_reference(q, scale)

    def _decode_reference(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Batched torch path: one gather of every sequence's pages (decompressed, this layer only),
        then SDPA with a mask over each sequence's own length."""
        store, n, bt = self.store, self.store.block, self.batch
        b, h, d = len(self.seqs), store.heads, store.head_dim
        parts_k, parts_v = [], []
        if bt.width:
            dense = store.pools[self.layer].read_dense(bt.table.long(), store.dtype)  # [B, width, H, n, d]
            parts_k.append(dense["key"].permute(0, 2, 1, 3, 4).reshape(b, h, bt.width * n, d))
            parts_v.append(dense["value"].permute(0, 2, 1, 3, 4).reshape(b, h, bt.width * n, d))
        parts_k.append(store.tail_k[self.layer][bt.rows])
        parts_v.append(store.tail_v[self.layer][bt.rows])
        keys, values = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)
        pos = torch.arange(keys.shape[2], device=q.device)
        paged = bt.width * n
        valid = torch.where(pos[None, :] < paged, pos[None, :] < (bt.npages * n)[:, None],
                            pos[None, :] - paged <= bt.cols[:, None])
        out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values,
                                                               attn_mask=valid[:, None, None, :], scale=scale,
                                                               enable_gqa=True)
        return out[:, :, 0]

    def _history(self, seq: SeqStep) -> tuple[torch.Tensor, torch.Tensor]:
        """[H, tokens, d] K and V of a sequence's stored tokens (pages + tail)."""
        store = self.store
        done = seq.start // store.block
        tail = seq.start % store.block
        k_tail = store.tail_k[self.layer][seq.slot, :, :tail]
        v_tail = store.tail_v[self.layer][seq.slot, :, :tail]
        if done == 0:
            return k_tail, v_tail
        ids = to_device(seq.pages[:done], store.device)
        dense = store.pools[self.layer].read_dense(ids, store.dtype)  # [pages, H, block, d]
        k = dense["key"].transpose(0, 1).reshape(store.heads, -1, store.head_dim)
        v = dense["value"].transpose(0, 1).reshape(store.heads, -1, store.head_dim)
        return torch.cat([k, k_tail], dim=1), torch.cat([v, v_tail], dim=1)

    # -- storing the step's tokens ----------------------------------------------------------------------
    def _store(self) -> None:
        """Tail + the step's tokens -> whole blocks into the new pages (compressed once), the rest
        back into the tail."""
        store, layer, n = self.store, self.layer, self.store.block
        if self.decode:  # each token is in its tail already
            rows = self.batch.filled_rows
            if rows is not None:
                self._write_pages(store.tail_k[layer][rows], store.tail_v[layer][rows], self.batch.filled_pages)
            return
        blocks_k, blocks_v, ids = [], [], []
        for seq, cols in self._segments():
            fill = seq.start % n
            k = torch.cat([store.tail_k[layer][seq.slot, :, :fill], self.new_k[0, :, cols]], dim=1)  # [H, fill+T, d]
            v = torch.cat([store.tail_v[layer][seq.slot, :, :fill], self.new_v[0, :, cols]], dim=1)
            full = seq.new_pages * n
            if full:
                blocks_k.append(k[:, :full].reshape(store.heads, seq.new_pages, n, -1).transpose(0, 1))
                blocks_v.append(v[:, :full].reshape(store.heads, seq.new_pages, n, -1).transpose(0, 1))
                ids += seq.pages[-seq.new_pages:]
            rest = k.shape[1] - full
            store.tail_k[layer][seq.slot, :, :rest] = k[:, full:]
            store.tail_v[layer][seq.slot, :, :rest] = v[:, full:]
        if ids:
            self._write_pages(torch.cat(blocks_k), torch.cat(blocks_v), to_device(ids, store.device))

    def _write_pages(self, k: torch.Tensor, v: torch.Tensor, page_ids: torch.Tensor) -> None:
        """Blocks ``[pages, H, block, d]`` into page ids: compressed once (kernel on CUDA)."""
        pool, cfg = self.store.pools[self.layer], self.store.compression
        if not cfg.compressed:
            pool.write(page_ids, {"key": k, "value": v})
        elif kernels.active(k.device) and kernels.supports_compress(cfg, self.store.block, self.store.head_dim):
            from gear_dist.kernels.compress import compress_into_pool

            compress_into_pool(k, v, pool, page_ids)
            kernels.launches["compress"] += 1
        else:
            pool.write(page_ids, {kind: compress(x, kind, cfg, cfg.rank) for kind, x in (("key", k), ("value", v))})


class EngineCache(Cache):
    """The step's view of the store as a transformers ``Cache``: one token per sequence
    (``decode``) or prefill chunks packed into one row."""

    def __init__(self, store: KVStore, seqs: list[SeqStep], decode: bool):
        batch = DecodeBatch.of(seqs, store.block, store.device) if decode else None
        super().__init__(layers=[StepLayer(store, i, seqs, batch) for i in range(store.layers)])
