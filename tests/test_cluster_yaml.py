from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs; raises when invalid
    gpus = {name: t["node_config"]["InstanceType"] for name, t in config["available_node_types"].items()}
    assert gpus == {"head.cpu": "m6i.2xlarge", "worker.gpu1": "p5.4xlarge", "worker.gpu8": "p5.48xlarge"}


def test_validator_rejects_a_broken_config():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(config))
