"""Experiments: Ray Tune sweeps over compression configs, logged to W&B and to a local report."""
