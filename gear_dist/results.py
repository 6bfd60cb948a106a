"""One schema for every measured figure (DESIGN §3), so tools and dashboards read any result.

``{"kind", "date", "device", "command", "versions", "rows": [...]}``, written as
``bench/results/<kind>-<device>-<date>.json`` (plus an optional suffix for variants).
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

RESULT_KINDS = ("codec", "quality", "kernels", "sass", "engine", "profile", "serve", "sweep")
_PACKAGES = ("torch", "transformers", "triton", "ray", "deepspeed", "hydra-core", "wandb")


def device_name() -> str:
    """'h100', 'h200', ... for a GPU (first one), else 'cpu'."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        match = re.search(r"\b([A-Z]\d{2,4})\b", name)
        count = torch.cuda.device_count()
        base = (match.group(1) if match else name).lower().replace(" ", "-")
        return f"{base}x{count}" if count > 1 else base
    return "cpu"


def versions() -> dict[str, str]:
    """Installed versions; for a package already imported, the version of the module in use (a
    ``PYTHONPATH`` entry can shadow the installed one, as for counting another Triton's code)."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        module = sys.modules.get(pkg.removesuffix("-core"))
        try:
            out[pkg] = getattr(module, "__version__", None) or metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda or ""
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def record(kind: str, rows: list[dict[str, Any]], command: str | None = None, **extra: Any) -> dict[str, Any]:
    if kind not in RESULT_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {RESULT_KINDS}")
    return {
        "kind": kind,
        "date": _dt.date.today().isoformat(),
        "device": device_name(),
        "command": command if command is not None else shlex.join(["python", *sys.argv]),
        "versions": versions(),
        **extra,
        "rows": rows,
    }


def markdown(rows: list[dict[str, Any]], columns: list[str], digits: int = 4) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (missing cells blank)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.{digits}g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(result: dict[str, Any], out_dir: str | Path = "bench/results", suffix: str = "") -> Path:
    """Write ``result`` as pretty JSON; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "-".join(p for p in (result["kind"], result["device"], result["date"], suffix) if p)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=float) + "\n")
    return path
