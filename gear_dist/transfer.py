"""Host lists to device tensors without making the host wait.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which synchronises the
stream: a decode step that does it a few times per layer runs the CPU and the GPU in turn.
Staged through pinned memory, the copy is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device``, copied asynchronously to a GPU."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
