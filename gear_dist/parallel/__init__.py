"""Tensor parallelism: a Ray actor group per model replica, DeepSpeed AutoTP inside each rank."""

from gear_dist.parallel.group import RankFailure, ShardGroup, check_divisible

__all__ = ["RankFailure", "ShardGroup", "check_divisible"]
