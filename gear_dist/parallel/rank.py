"""One tensor-parallel rank: a process holding its shard of the model and its KV heads' pages.

DeepSpeed AutoTP (``deepspeed.init_inference(..., tensor_parallel={"tp_size": tp},
replace_with_kernel_inject=False)``) splits every attention and MLP projection across ranks
after loading; attention then sees ``num_kv_heads / tp`` KV heads, so this rank's GEAR cache
compresses only its own heads and the compression needs no communication.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

import torch

from gear_dist.config import CompressionConfig, EngineConfig, ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def setup_distributed(rank: int, world: int, port: int, backend: str, timeout_s: float) -> None:
    """torch.distributed over loopback. LOCAL_SIZE must equal the world size on CPU, or
    DeepSpeed's shared-memory all-reduce segfaults (DESIGN §5)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.distributed.init_process_group(backend, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=timeout_s))


def _init_random_(model: torch.nn.Module, seed: int) -> None:
    """Random weights for memory-materialized shards, drawn on the shard's device. Every rank
    draws the same shapes in the same order from the same seed, so replicated parameters
    (embeddings, norms) agree; norms start at one as in transformers."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def load_sharded(model_cfg: ModelConfig, tp: int, device: torch.device):
    """This rank's shard. Random shapes are built on the meta device and only the shard is
    materialized (a 70B shape never exists whole in one process); real weights are loaded and
    then split by AutoTP."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from gear_dist.models import load, random_config

    dtype = DTYPES[model_cfg.dtype]
    if model_cfg.source == "random":
        overrides = dict(model_cfg.overrides)
        if model_cfg.num_layers:
            overrides["num_hidden_layers"] = model_cfg.num_layers
        config = random_config(model_cfg.name, **overrides)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, replace_with_kernel_inject=False,
                                         dtype=dtype).module
        model.to_empty(device=device)
        _init_random_(model, seed=0)
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        with torch.device(device):  # its buffers were meta: compute them again
            inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    else:
        model, _ = load(ModelConfig(**{**vars(model_cfg), "device": "cpu", "tp": 1}))
        model = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, replace_with_kernel_inject=False,
                                         dtype=dtype).module
        model.to(device)
    return model.eval()


def shm_segment(rank: int, port: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce maps for ``rank`` of the group that
    meets at 127.0.0.1:``port`` (its naming, deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    return Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}")


class RankWorker:
    """The body of a rank actor (gear_dist.parallel.group wraps it in ``ray.remote``)."""

    def __init__(self, rank: int, world: int, port: int, model_cfg: ModelConfig, compression: CompressionConfig,
                 engine_cfg: EngineConfig, use_gpu: bool, timeout_s: float):
        self.rank, self.world = rank, world
        if use_gpu:
            import ray

            gpu = int(ray.get_gpu_ids()[0])
            torch.cuda.set_device(gpu)
            self.device = torch.device("cuda", gpu)
        else:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
            self.device = torch.device("cpu")
        setup_distributed(rank, world, port, "nccl" if use_gpu else "gloo", timeout_s)
        from gear_dist.cache import use_gear_attention

        self.model = load_sharded(model_cfg, world, self.device)
        if not use_gpu:
            # DeepSpeed never unlinks its 64 MiB segment per rank, and killed ranks cannot: each group
            # would stay in /dev/shm. Once every rank has mapped every segment (DeepSpeed's init, then
            # this barrier) the name is not needed; the memory goes when the ranks exit.
            torch.distributed.barrier()
            shm_segment(rank, port).unlink(missing_ok=True)
        use_gear_attention(self.model)
        self.compression, self.engine_cfg = compression, engine_cfg
        self.dtype = next(self.model.parameters()).dtype

    def kv_budget(self) -> int:
        """Bytes this rank can give its KV store."""
        from gear_dist.engine.core import kv_budget_bytes

        return kv_budget_bytes(self.engine_cfg, self.device)

    def build(self, pages: int) -> dict:
        """Allocate this rank's KV store (the driver chose ``pages``, the minimum over ranks)."""
        from gear_dist.engine.kv import KVLayout, KVStore
        from gear_dist.engine.worker import Worker

        layout = KVLayout.of(self.model.config, self.compression, self.engine_cfg, self.dtype, tp=self.world)
        store = KVStore(layout, self.compression, pages, self.dtype, self.device)
        self.worker = Worker(self.model, store, samples=self.rank == 0)
        return dict(rank=self.rank, kv_heads=layout.heads, kv_bytes=layout.nbytes(pages), pid=os.getpid())

    def execute(self, plan):
        return self.worker.execute(plan)

    def kv_nbytes(self) -> int:
        """Bytes this rank's KV store holds (pages of its heads plus tails)."""
        return self.worker.store.nbytes()

    def call(self, fn):
        """Run a driver-supplied ``fn(self)`` here (ShardGroup.collective_rpc)."""
        return fn(self)

    def memory(self) -> dict:
        if self.device.type == "cuda":
            return dict(peak_gib=torch.cuda.max_memory_allocated(self.device) / 2**30,
                        allocated_gib=torch.cuda.memory_allocated(self.device) / 2**30)
        return {}
