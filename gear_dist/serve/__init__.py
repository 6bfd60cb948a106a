"""Serving: an OpenAI-compatible Ray Serve app over the engine (streaming, errors, metrics)."""
