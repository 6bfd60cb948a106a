"""Serve a (sharded) model with GEAR-compressed KV behind an OpenAI-compatible API on Ray Serve.

    python jobs/serve.py                                         # SmolLM2-135M, 2-bit GEAR, 127.0.0.1:8000
    python jobs/serve.py model=llama3_70b model.tp=2 compression=gear serve.host=0.0.0.0
    python jobs/serve.py serve.export_config=serve.yaml && serve deploy serve.yaml   # a running cluster

Uses the Ray cluster at $RAY_ADDRESS, else starts a local one. Blocks until interrupted.
"""

from __future__ import annotations

import os
import time

import hydra
import ray
import yaml
from omegaconf import DictConfig, OmegaConf
from ray import serve

from gear_dist.config import Config, register_configs
from gear_dist.serve.app import build_app, model_id, serve_config_yaml

register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    config: Config = OmegaConf.to_object(cfg)
    if config.serve.export_config:
        with open(config.serve.export_config, "w") as f:
            yaml.safe_dump(serve_config_yaml(config), f, sort_keys=False)
        print(f"wrote {config.serve.export_config}; deploy it with: serve deploy {config.serve.export_config}")
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60 enables token auth by default
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False)
    serve.start(http_options={"host": config.serve.host, "port": config.serve.port})
    serve.run(build_app(config), name="gear_dist", route_prefix=config.serve.route_prefix)
    url = f"http://{config.serve.host}:{config.serve.port}{config.serve.route_prefix.rstrip('/')}"
    print(f"serving {model_id(config)} at {url}/v1 (metrics: {url}/metrics)")
    print(f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{model_id(config)}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
