"""The ``gear`` attention implementation for transformers models.

Registered under the name ``gear`` in transformers' ``AttentionInterface`` (and, for masks, as
``sdpa`` masks), it lets a model read K/V held compressed by a :class:`GearLayer`: the layer's
``update`` tags the step's K/V with itself, and this function attends over what the layer holds,
then lets the layer compress the blocks the step filled. K/V that carry no tag (no GEAR cache,
or a plain ``DynamicCache``) go to transformers' own ``sdpa`` unchanged.

Two paths, chosen by ``gear_dist.kernels.use_kernels``: the Triton decode kernel reads the pages
directly (one query token, CUDA by default); the torch reference decompresses this one layer's
pages and feeds them to SDPA (eager math when the model uses logit soft-capping).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "gear"


def gear_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    """transformers' attention interface: K/V tagged by a GEAR cache layer are attended by that
    layer (which knows what it holds); anything else goes to SDPA as usual."""
    layer = getattr(key, "gear_layer", None)
    if layer is None:
        return attend_dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return layer.attend(module, query, attention_mask, dropout, scaling, **kwargs)


def attend_dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """SDPA, or eager math when the model soft-caps its logits."""
    softcap = kwargs.pop("softcap", None)
    if softcap is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return eager_softcap_attention(query, key, value, attention_mask, scaling, softcap)


def eager_softcap_attention(query, key, value, mask, scaling, softcap):
    """Attention with tanh logit soft-capping (Gemma-2 style), which SDPA cannot express."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def register() -> None:
    """Make ``attn_implementation="gear"`` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, gear_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_gear_attention(model) -> None:
    """Switch ``model`` to the ``gear`` attention implementation (needed by GEARCache)."""
    register()
    model.set_attn_implementation(NAME)
