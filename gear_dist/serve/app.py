"""The Ray Serve application: one deployment per model replica, the FastAPI ingress inside it.

``build_app(config)`` is where ``serve.deployment`` is applied (Ray Serve LLM's "decoration
happens in builder functions"): replicas and autoscaling come from ``config.serve``; a replica
with ``model.tp > 1`` owns a placement group of shard actors (gear_dist.parallel). The same
builder backs ``serve run`` / ``serve deploy`` through :func:`app_builder`.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf
from ray import serve

from gear_dist.config import Config

logger = logging.getLogger(__name__)


def config_to_dict(config: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config))


def config_from_dict(data: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))


def model_id(config: Config) -> str:
    return config.serve.model_id or config.model.name.rstrip("/").rsplit("/", 1)[-1]


@serve.ingress()
class OpenAIServer:
    """One replica: an engine (single process, or a tensor-parallel group it owns) behind the API."""

    def __init__(self, config: dict):
        from gear_dist.engine.build import build_engine

        self.config = config_from_dict(config)
        self.engine = build_engine(self.config)

    def __serve_build_asgi_app__(self):
        from gear_dist.serve.api import create_app

        return create_app(self.engine, model_id(self.config), self.config.serve.api_key or None)

    def __del__(self):
        shutdown = getattr(getattr(getattr(self, "engine", None), "core", None), "worker", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()


def deployment_options(config: Config) -> dict:
    """Replicas, autoscaling and per-replica resources (a TP replica's GPUs are its actors')."""
    s = config.serve
    options: dict = {"max_ongoing_requests": s.max_ongoing_requests, "name": "OpenAIServer"}
    if s.autoscaling:
        options["autoscaling_config"] = {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                         "target_ongoing_requests": s.target_ongoing_requests}
    else:
        options["num_replicas"] = s.num_replicas
    single_gpu = config.model.tp == 1 and config.model.resolved_device() == "cuda"
    options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1 if single_gpu else 0}
    return options


def build_app(config: Config):
    """The bound application for ``serve.run``."""
    return serve.deployment(OpenAIServer).options(**deployment_options(config)).bind(config_to_dict(config))


def app_builder(args: dict):
    """Entry point for ``serve run gear_dist.serve.app:app_builder`` / ``serve deploy``:
    ``args`` is the config as a dict (jobs/serve.py --print-config writes one)."""
    return build_app(config_from_dict(args))


def serve_config_yaml(config: Config) -> dict:
    """A Serve config file (``serve deploy``) for ``config``."""
    return {
        "http_options": {"host": config.serve.host, "port": config.serve.port},
        "applications": [{"name": "gear_dist", "route_prefix": config.serve.route_prefix,
                          "import_path": "gear_dist.serve.app:app_builder", "args": config_to_dict(config)}],
    }

