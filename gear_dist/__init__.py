"""gear_dist: GEAR KV-cache compression, sharded and served at cluster scale."""

__version__ = "0.1.0"
