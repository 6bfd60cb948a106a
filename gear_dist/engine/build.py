"""One way to get an engine for a config: a single process, or a tensor-parallel Ray group."""

from __future__ import annotations

from gear_dist.config import CompressionConfig, Config


def build_engine(config: Config, compression: CompressionConfig | None = None):
    """An :class:`LLMEngine` for ``config`` (``model.tp > 1``: a :class:`ShardGroup` of Ray actors,
    started on the running Ray cluster, or a local one)."""
    from gear_dist.cache import use_gear_attention
    from gear_dist.engine.core import LLMEngine
    from gear_dist.models import load, load_config, load_generation_config, load_tokenizer

    compression = compression or config.compression
    if config.model.tp == 1:
        model, tokenizer = load(config.model)
        use_gear_attention(model)
        return LLMEngine(model, tokenizer, compression, config.engine)
    import ray

    from gear_dist.parallel import ShardGroup

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    model_config = load_config(config.model)
    group = ShardGroup(config.model, model_config, compression, config.engine, config.model.tp,
                       use_gpu=config.model.resolved_device() == "cuda")
    return LLMEngine.from_worker(group, group.layout, group.pages, model_config, load_generation_config(config.model),
                                 load_tokenizer(config.model), config.engine)
