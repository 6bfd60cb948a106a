"""One layer of a GEAR cache for a batch of aligned sequences (Hugging Face ``generate``).

Streaming as DESIGN §1.5: new K/V go to an fp16 tail; after each forward step, whole blocks are
cut from the front of the tail and compressed once into pages, never to be touched again:
prefill steps (several query tokens) cut ``prefill_block_size`` blocks at ``rank_prefill``, then
every step cuts ``block_size`` blocks at ``rank``, so the tail always holds fewer than
``block_size`` tokens. Compression runs *after* the step's attention, so every token is first
attended at full precision, as in the paper and KIVI.

Padding: the step's attention mask says which new positions are real; padded positions never
enter statistics, outlier selection or the low-rank fit (the codec's ``valid`` mask).

Layout along positions: ``segments`` (pages, oldest first) then the tail. Each segment is one
page per sequence (``ids [B]``) covering the same positions for every sequence.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from gear_dist import kernels
from gear_dist.cache.pool import PagePool
from gear_dist.codec import compress
from gear_dist.config import CompressionConfig
from gear_dist.transfer import to_device

if TYPE_CHECKING:
    from gear_dist.kernels.decode_attention import PagedKV

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    pool: str  # "prefill" or "decode"
    ids: torch.Tensor  # [B] page id of each sequence
    start: int  # absolute position of the first token
    tokens: int


class GearLayer(CacheLayerMixin):
    """A ``CacheLayerMixin`` whose ``update`` stores and whose attention reads compressed pages.

    ``update`` returns the new K/V tagged with this layer; the ``gear`` attention function
    (gear_dist.cache.attention) finds the layer through the tag, attends over everything held and
    then calls :meth:`commit` with the step's mask.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, compression: CompressionConfig, sliding_window: int | None = None):
        super().__init__()
        self.compression = compression
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._clear()

    def _clear(self) -> None:
        self.segments: list[Segment] = []
        self.tail_start = 0  # absolute position of the tail's first token
        self.length = 0  # tokens seen (absolute position of the next one)
        self.pending = 0  # tokens appended by update() and not yet committed

    # -- state -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.heads, self.head_dim = h, d
        self.pools: dict[str, PagePool] = {}  # one pool per page format
        self.pool_of: dict[str, str] = {}  # "prefill" / "decode" -> the pool holding that role's pages
        if self.compression.compressed:
            c = self.compression
            for role, tokens, rank in (("prefill", c.prefill_block_size, c.rank_prefill),
                                       ("decode", c.block_size, c.rank)):
                key = f"{tokens}x{rank}"
                if key not in self.pools:
                    self.pools[key] = PagePool(c, tokens, rank, h, d, self.device)
                self.pool_of[role] = key
        self.tail_k = key_states.new_empty((b, h, 0, d))
        self.tail_v = value_states.new_empty((b, h, 0, d))
        self.tail_valid = torch.empty((b, 0), dtype=torch.bool, device=self.device)
        self.valid_from = torch.zeros(b, dtype=torch.int32, device=self.device)  # left padding ends here
        self.found_real = torch.zeros(b, dtype=torch.bool, device=self.device)
        self.prefix_padding = True  # padding seen so far is a prefix (what the GPU kernel handles)
        self._clear()
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self.tail_k.shape[0]

    @property
    def offset(self) -> int:
        """Absolute position of the first token held (> 0 once a sliding window dropped pages)."""
        return self.segments[0].start if self.segments else self.tail_start

    @property
    def held(self) -> int:
        return self.length - self.offset

    # -- the transformers CacheLayerMixin API -------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.pending:
            raise RuntimeError(
                "GEARCache: update() was called twice without attention in between. The model must use the "
                "'gear' attention implementation: call gear_dist.cache.use_gear_attention(model) first."
            )
        self.tail_k = torch.cat([self.tail_k, key_states], dim=-2)
        self.tail_v = torch.cat([self.tail_v, value_states], dim=-2)
        self.length += key_states.shape[-2]
        self.pending = key_states.shape[-2]
        key_states, value_states = key_states.clone(), value_states.clone()  # tags must not leak onto the caller's tensors
        key_states.gear_layer = value_states.gear_layer = self
        return key_states, value_states

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.held + query_length, self.offset

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        if self.is_initialized:
            for seg in self.segments:
                self.pools[seg.pool].release(seg.ids)
        self._clear()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove tokens from the end: ``-n`` removes n; a positive value is the length to keep
        (the pre-5.18 transformers convention). Pages cut in the middle are decompressed back
        into the tail (their tokens stay as compressed values, not the originals)."""
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = self.length + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, self.length)
        if keep < self.offset:
            raise ValueError(f"crop: cannot keep {keep} tokens, positions before {self.offset} were dropped by "
                             f"the sliding window of {self.sliding_window}")
        while keep < self.tail_start:  # the cut falls inside a page: bring pages back to the tail
            seg = self.segments.pop()
            k, v = self._decompress([seg])
            self.tail_k = torch.cat([k, self.tail_k], dim=-2)
            self.tail_v = torch.cat([v, self.tail_v], dim=-2)
            ones = torch.ones((self.batch_size, seg.tokens), dtype=torch.bool, device=self.device)
            self.tail_valid = torch.cat([ones, self.tail_valid], dim=-1)  # padding was masked out already
            self.tail_start = seg.start
            self.pools[seg.pool].release(seg.ids)
        cut = keep - self.tail_start
        self.tail_k, self.tail_v = self.tail_k[..., :cut, :].clone(), self.tail_v[..., :cut, :].clone()
        self.tail_valid = self.tail_valid[:, :cut].clone()
        self.length = keep

    # -- attention-side API ------------------------------------------------------------------------
    def attend(self, module, query: torch.Tensor, attention_mask, dropout: float, scaling: float | None, **kwargs):
        """This step's attention over everything held, then :meth:`commit`. One query token on a
        kernel-ready layer goes to the Triton decode kernel; otherwise the layer is decompressed
        (this layer only) and attended by SDPA, the torch reference."""
        from gear_dist.cache.attention import attend_dense

        if kernels.active(query.device) and self.kernel_ready(query, dropout, kwargs.get("softcap")):
            from gear_dist.kernels.decode_attention import gear_decode_attention

            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            out = gear_decode_attention(query[:, :, 0], self.paged(), scale)  # [B, Hq, D]
            kernels.launches["decode_attention"] += 1
            result = (out[:, None], None)  # transformers' layout: [B, q_len, Hq, D]
        else:
            keys, values = self.materialize()
            result = attend_dense(module, query, keys, values, attention_mask, dropout, scaling, **kwargs)
        self.commit(attention_mask)
        return result

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All held K and V as ``[B, H, held, d]`` in the model dtype: the torch reference path
        (one layer at a time, freed when the step's attention returns)."""
        k, v = self._decompress(self.segments)
        return torch.cat([k, self.tail_k], dim=-2), torch.cat([v, self.tail_v], dim=-2)

    def commit(self, attention_mask: torch.Tensor | None) -> None:
        """After the step's attention: record which new tokens are real, compress full blocks,
        drop pages a sliding window no longer sees."""
        q, self.pending = self.pending, 0
        valid = _new_token_validity(attention_mask, q, self.batch_size).to(self.device)
        self._track_padding(valid)
        self.tail_valid = torch.cat([self.tail_valid, valid], dim=-1)
        if self.compression.compressed:
            if q > 1:
                self._compress_front("prefill")
            self._compress_front("decode")
        if self.is_sliding:
            self._slide()

    def kernel_ready(self, query: torch.Tensor, dropout: float, softcap) -> bool:
        """Whether this step's attention can run in the decode kernel (else the torch reference)."""
        return (self.compression.compressed and query.shape[2] == 1 and dropout == 0.0 and softcap is None
                and self.prefix_padding
                and all(kernels.supports(self.compression, p.tokens, self.head_dim) for p in self.pools.values()))

    def paged(self) -> "PagedKV":
        """The layer as the decode kernel reads it: per pool, page tables in position order;
        a sliding window moves where each sequence's visible tokens begin."""
        from gear_dist.kernels.decode_attention import PagedKV

        b, dev = self.batch_size, self.device
        pools = []
        for name, pool in self.pools.items():
            segs = [s for s in self.segments if s.pool == name]
            table = torch.stack([s.ids for s in segs], 1).int() if segs else torch.zeros(b, 0, dtype=torch.int32, device=dev)
            pos = to_device([s.start for s in segs], dev, torch.int32).expand(b, len(segs)).contiguous()
            pools.append((pool, table, pos, torch.full((b,), len(segs), dtype=torch.int32, device=dev)))
        full = lambda v: torch.full((b,), v, dtype=torch.int32, device=dev)  # noqa: E731
        valid_from = self.valid_from
        if self.is_sliding:  # the query at position length-1 sees positions >= length - window
            valid_from = torch.clamp(valid_from, min=self.length - self.sliding_window)
        return PagedKV(pools, self.tail_k, self.tail_v, full(self.tail_k.shape[-2]), full(self.tail_start),
                       valid_from)

    def _track_padding(self, valid: torch.Tensor) -> None:
        """Keep ``valid_from`` (first real position of each sequence) and whether all padding
        seen is a prefix, the only kind the decode kernel masks (left padding always is)."""
        q = valid.shape[1]
        start = self.length - q
        any_real = valid.any(1)
        first = torch.where(any_real, valid.int().argmax(1), q) + start
        self.valid_from = torch.where(self.found_real, self.valid_from, first.int())
        positions = torch.arange(start, start + q, device=self.device)
        self.prefix_padding &= bool((valid == (positions[None, :] >= self.valid_from[:, None])).all())
        self.found_real |= any_real

    def nbytes(self) -> int:
        """Bytes really held: every pool tensor plus the fp16 tail."""
        if not self.is_initialized:
            return 0
        tail = sum(t.numel() * t.element_size() for t in (self.tail_k, self.tail_v, self.tail_valid))
        return tail + sum(pool.nbytes for pool in self.pools.values())

    def nbytes_breakdown(self) -> dict[str, int]:
        if not self.is_initialized:
            return {}
        out = {f"pages_{name}": pool.nbytes for name, pool in self.pools.items()}
        out["tail"] = sum(t.numel() * t.element_size() for t in (self.tail_k, self.tail_v, self.tail_valid))
        return out

    # -- internals ---------------------------------------------------------------------------------
    def _compress_front(self, role: str) -> None:
        pool_name = self.pool_of[role]
        pool = self.pools[pool_name]
        n = pool.tokens
        count = self.tail_k.shape[-2] // n
        if count == 0:
            return
        b, h, d = self.batch_size, self.heads, self.head_dim
        cut = count * n

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [B, H, cut, d] -> [B, count, H, n, d]
            return t[..., :cut, :].reshape(b, h, count, n, d).transpose(1, 2)

        valid = self.tail_valid[:, :cut].reshape(b, count, 1, n)
        ids = pool.allocate(b * count).reshape(b, count)
        if kernels.active(self.device) and kernels.supports_compress(self.compression, n, d):
            from gear_dist.kernels.compress import compress_into_pool

            keys, values = (blocks(t).reshape(b * count, h, n, d) for t in (self.tail_k, self.tail_v))
            compress_into_pool(keys, values, pool, ids.reshape(-1), valid.reshape(b * count, n))
            kernels.launches["compress"] += 1
        else:
            pool.write(ids, {kind: compress(blocks(t), kind, self.compression, pool.rank, valid)
                             for kind, t in (("key", self.tail_k), ("value", self.tail_v))})
        for j in range(count):
            self.segments.append(Segment(pool_name, ids[:, j], self.tail_start + j * n, n))
        self.tail_k, self.tail_v = self.tail_k[..., cut:, :].clone(), self.tail_v[..., cut:, :].clone()
        self.tail_valid = self.tail_valid[:, cut:].clone()
        self.tail_start += cut

    def _decompress(self, segments: list[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decompress ``segments`` (in order) into ``[B, H, tokens, d]`` K and V, one gather per
        run of consecutive segments from the same pool."""
        b, h, d = self.batch_size, self.heads, self.head_dim
        ks, vs = [self.tail_k.new_empty((b, h, 0, d))], [self.tail_v.new_empty((b, h, 0, d))]
        i = 0
        while i < len(segments):
            j = i
            while j < len(segments) and segments[j].pool == segments[i].pool:
                j += 1
            ids = torch.stack([s.ids for s in segments[i:j]], dim=1)  # [B, m]
            dense = self.pools[segments[i].pool].read_dense(ids, self.dtype)  # [B, m, H, n, dh]
            for kind, out in (("key", ks), ("value", vs)):
                out.append(dense[kind].transpose(1, 2).reshape(b, h, -1, d))
            i = j
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    def _select_batch(self, index: torch.Tensor) -> None:
        """Rows ``index`` of the batch (beam reorder, repeat, select). Pages are shared, not copied."""
        if not self.is_initialized:
            return
        index = index.to(self.device)
        for seg in self.segments:
            new_ids = seg.ids.index_select(0, index)
            self.pools[seg.pool].retain(new_ids)
            self.pools[seg.pool].release(seg.ids)
            seg.ids = new_ids
        self.tail_k = self.tail_k.index_select(0, index)
        self.tail_v = self.tail_v.index_select(0, index)
        self.tail_valid = self.tail_valid.index_select(0, index)
        self.valid_from = self.valid_from.index_select(0, index)
        self.found_real = self.found_real.index_select(0, index)

    def _slide(self) -> None:
        """Drop pages the next query can no longer see (it attends the last ``window`` positions)."""
        first_needed = self.length - self.sliding_window + 1
        while self.segments and self.segments[0].start + self.segments[0].tokens <= first_needed:
            seg = self.segments.pop(0)
            self.pools[seg.pool].release(seg.ids)


def _new_token_validity(mask: torch.Tensor | None, new: int, batch: int) -> torch.Tensor:
    """[B, new] bool: a new position is real when some query attends it (left padding is
    attended by no one). ``mask`` is the step's [B|1, 1, q, kv] mask (bool, or additive float)."""
    if mask is None:
        return torch.ones((batch, new), dtype=torch.bool)
    cols = mask[:, 0, :, -new:]
    allowed = cols if cols.dtype == torch.bool else cols > torch.finfo(cols.dtype).min
    return allowed.any(dim=1).expand(batch, new)
