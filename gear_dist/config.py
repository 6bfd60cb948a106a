"""Typed configs, one dataclass per concern, mirrored 1:1 by ``conf/<group>/*.yaml``.

Every dataclass validates itself in ``__post_init__`` and raises a ``ValueError`` that names the
offending field and the allowed values, so a bad Hydra override fails at startup, not mid-run.
They are plain (not frozen) dataclasses because Hydra merges YAML options into them; build
changed copies with ``dataclasses.replace`` so validation runs again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

BITS = (2, 3, 4, 8, 16)  # 16 means "no compression" (the fp16 baseline)
BACKBONES = ("kivi", "kcvt", "uniform")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {message}")


@dataclass
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
    rank_prefill: int = 2  # r for the prompt's blocks
    iters: int = 3  # power-iteration passes
    oversample: int = 4  # extra power-iteration columns, dropped by Rayleigh-Ritz (codec.lowrank)
    block_size: int = 64  # n_b: tokens per streaming block (the fp16 tail holds fewer)
    # NOTE: the paper compresses the prompt in larger blocks at r=4; 64-token pages at r=2 cost the
    # same bits at d=128 (fewer at d=64), land within 3% of its error on real K/V, and give every
    # page one format: one pool, one kernel launch, and prompts compressed by the GPU kernel.
    prefill_block_size: int = 64  # tokens per prompt block; a multiple of block_size
    seed: int = 0  # power-iteration init, so compression is deterministic

    def __post_init__(self) -> None:
        _require(self.bits in BITS, "bits", f"{self.bits} is not one of {BITS}")
        _require(self.backbone in BACKBONES, "backbone", f"{self.backbone!r} is not one of {BACKBONES}")
        for name in ("group_size", "block_size", "prefill_block_size", "iters"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("rank", "rank_prefill", "oversample"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(0.0 <= self.outlier_ratio < 0.5, "outlier_ratio",
                 f"must lie in [0, 0.5), got {self.outlier_ratio}")
        _require(self.prefill_block_size % self.block_size == 0, "prefill_block_size",
                 f"{self.prefill_block_size} is not a multiple of block_size={self.block_size}")
        if self.compressed and self.backbone == "kivi":
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


MODEL_SOURCES = ("packaged", "pretrained", "random")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    """Which model to load (gear_dist.models): packaged real weights, a path or hub id, or random
    weights of a named architecture shape."""

    source: str = "packaged"  # packaged | pretrained | random
    name: str = "smollm2-135m-instruct"  # packaged name, path / hub id, or architecture name
    dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    num_layers: int = 0  # keep only the first layers (a fast cut of a real model); 0 = all
    tp: int = 1  # tensor-parallel ranks (gear_dist.parallel)
    overrides: dict[str, Any] = field(default_factory=dict)  # transformers config fields (random shapes)
    tokenizer: str = ""  # "" = the model's own; random models borrow the packaged SmolLM2 tokenizer

    def __post_init__(self) -> None:
        _require(self.source in MODEL_SOURCES, "source", f"{self.source!r} is not one of {MODEL_SOURCES}")
        _require(bool(self.name), "name", f"must be set: a path or hub id for source={self.source!r}")
        _require(self.dtype in DTYPES, "dtype", f"{self.dtype!r} is not one of {DTYPES}")
        _require(self.num_layers >= 0, "num_layers", f"must be >= 0, got {self.num_layers}")
        _require(self.tp >= 1, "tp", f"must be >= 1, got {self.tp}")

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


EVAL_TASKS = ("kv", "ppl", "greedy", "gsm8k_nll", "gsm8k_em", "passkey")


@dataclass
class EvalConfig:
    """The quality harness (gear_dist.evals.harness): which tasks, on how much data."""

    tasks: list[str] = field(default_factory=lambda: ["kv", "ppl", "greedy", "gsm8k_nll", "passkey"])
    text: str = "wikipedia"  # corpus for kv, ppl, greedy prompts and passkey haystacks
    kv_tokens: int = 2048  # tokens whose K/V are captured for the kv task
    ppl_windows: int = 4
    ppl_context: int = 1024  # tokens per window
    ppl_prefix: int = 512  # prefilled (compressed) before scoring starts
    greedy_prompts: int = 2
    greedy_context: int = 512
    greedy_tokens: int = 256
    gsm8k_path: str | None = None  # directory with train.jsonl / test.jsonl; None: ../shared/data/gsm8k
    gsm8k_problems: int = 16
    gsm8k_shots: int = 8
    gsm8k_max_new_tokens: int = 256
    passkey_contexts: list[int] = field(default_factory=lambda: [512, 1024])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    passkey_trials: int = 1
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(EVAL_TASKS))
        _require(not unknown, "tasks", f"unknown tasks {unknown}; choose from {EVAL_TASKS}")
        for name in ("kv_tokens", "ppl_windows", "ppl_context", "greedy_prompts", "greedy_tokens",
                     "gsm8k_problems", "passkey_trials", "batch_size"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(0 <= self.ppl_prefix < self.ppl_context, "ppl_prefix",
                 f"must lie in [0, ppl_context={self.ppl_context}), got {self.ppl_prefix}")
        _require(0 <= self.gsm8k_shots <= 8, "gsm8k_shots", f"must lie in [0, 8], got {self.gsm8k_shots}")
        _require(all(0.0 <= d <= 1.0 for d in self.passkey_depths), "passkey_depths", "each must lie in [0, 1]")


@dataclass
class EngineConfig:
    """The inference engine (gear_dist.engine): batch, memory budget, chunking."""

    max_num_seqs: int = 64  # sequences decoded together (each holds one fp16 tail slot)
    kv_cache_gib: float = 0.0  # KV budget; 0 = gpu_memory_fraction of free GPU memory, or 1 GiB on CPU
    gpu_memory_fraction: float = 0.9
    max_model_len: int = 0  # prompt + generated tokens per sequence; 0 = the model's maximum
    prefill_chunk: int = 512  # prompt tokens per forward (chunked prefill)
    max_waiting: int = 1024  # queued requests beyond which new ones are refused (serving: 429/503)
    reserve_output: float = 1.0  # share of max_tokens whose pages are promised at admission (0: optimistic)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "prefill_chunk", "max_waiting"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        for name in ("kv_cache_gib", "max_model_len"):
            _require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _require(0 < self.gpu_memory_fraction <= 1, "gpu_memory_fraction",
                 f"must lie in (0, 1], got {self.gpu_memory_fraction}")
        _require(0 <= self.reserve_output <= 1, "reserve_output", f"must lie in [0, 1], got {self.reserve_output}")


@dataclass
class BenchConfig:
    """jobs/bench.py: offline engine throughput for several compression methods in one run."""

    methods: list[str] = field(default_factory=lambda: ["fp16", "kivi", "gear"])  # conf/compression names
    num_prompts: int = 256  # 0: as many as each method's KV memory holds at once
    prompt_len: int = 1024
    new_tokens: int = 512
    max_num_seqs: int = 1024
    hf_baseline: bool = True
    hf_batches: list[int] = field(default_factory=lambda: [256, 128, 64, 32, 16])
    hf_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "max_num_seqs", "hf_new_tokens"):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(self.num_prompts >= 0, "num_prompts", f"must be >= 0 (0: as many as memory holds), got {self.num_prompts}")
        _require(bool(self.methods), "methods", "must name at least one compression config")


@dataclass
class ServeConfig:
    """The Ray Serve application (gear_dist.serve): where, under which name, how many replicas."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_id: str = ""  # the name clients send as "model"; "" = the model config's name
    api_key: str = ""  # "" = no authentication
    route_prefix: str = "/"
    num_replicas: int = 1  # ignored when autoscaling
    autoscaling: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: int = 32
    max_ongoing_requests: int = 256
    export_config: str = ""  # a path: write a `serve deploy` config file there instead of serving

    def __post_init__(self) -> None:
        _require(0 < self.port < 65536, "port", f"must be a TCP port, got {self.port}")
        for name in ("num_replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "max_ongoing_requests"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.min_replicas <= self.max_replicas, "min_replicas",
                 f"{self.min_replicas} exceeds max_replicas={self.max_replicas}")


@dataclass
class SweepConfig:
    """A Ray Tune sweep (jobs/sweep.py): which configs, what each trial measures, where it runs."""

    name: str = "quick"
    models: list[str] = field(default_factory=lambda: ["smollm2"])  # conf/model options
    methods: list[str] = field(default_factory=lambda: ["fp16", "kivi", "gear_l", "gear"])  # conf/compression options
    grid: dict[str, list[Any]] = field(default_factory=dict)  # compression field -> values, crossed (compressed methods)
    random: dict[str, list[Any]] = field(default_factory=dict)  # compression field -> choices, drawn per sample
    num_samples: int = 1  # draws of the random choices per grid point
    batches: list[int] = field(default_factory=lambda: [1, 4])  # throughput benchmark batch sizes
    prompt_len: int = 128
    new_tokens: int = 16
    cpus_per_trial: int = 1
    gpus_per_trial: int = 0  # per rank; a model with tp > 1 gets a placement group of tp bundles
    max_concurrent_trials: int = 2
    resume: bool = True  # continue an interrupted sweep of the same name
    storage: str = ""  # "" = <results_dir>/sweeps

    def __post_init__(self) -> None:
        _require(bool(self.methods), "methods", "must name at least one conf/compression option")
        _require(bool(self.models), "models", "must name at least one conf/model option")
        _require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        _require(all(b >= 1 for b in self.batches), "batches", "must be positive")
        fields = {f.name for f in dataclasses.fields(CompressionConfig)}
        unknown = sorted((set(self.grid) | set(self.random)) - fields)
        _require(not unknown, "grid", f"unknown compression fields {unknown}")


@dataclass
class WandbConfig:
    """Weights & Biases logging: offline by default (no account); online when a key is set."""

    project: str = "gear_dist"
    group: str = ""  # "" = the sweep's name
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # offline | online | disabled
    dir: str = ""  # "" = the sweep's run directory

    def __post_init__(self) -> None:
        _require(self.mode in ("offline", "online", "disabled"), "mode", f"{self.mode!r} is not offline, online or disabled")


@dataclass
class Config:
    """The whole job: one config flows unchanged from eval and sweep to serve (conf/config.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    results_dir: str = "bench/results"


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore; ``conf/config.yaml`` lists ``base_config``
    first, so every YAML option is type-checked and a misspelt key fails at startup."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
