"""Keep the bridge's attention KV cache working whatever name transformers gives the cache.

TransformerBridge replaces each Hugging Face attention module by an ``AttentionBridge``. Most
bridge classes *reimplement* attention (so that ``hook_attn_scores``, ``hook_pattern`` and
``hook_rot_q`` fire at the right stage) and extend K / V with the KV cache themselves, reading the
cache from the keyword argument ``past_key_values`` (or ``layer_past``). transformers 5.24 renamed
that argument to ``cache`` (``past_key_values`` is deprecated there). A decoder layer of 5.24 calls
``self_attn(..., cache=cache)``, the bridge finds no ``past_key_values``, never updates the cache,
and every decoding step after the first attends to its own token alone: the first new token is
right and the rest is garbage (``"B-----------"``), silently.

:func:`install_cache_alias` fixes that seam for any transformers version: a keyword forward
pre-hook on every reimplementing attention bridge passes the cache under ``past_key_values`` too
when the caller named it ``cache``. Bridges that delegate to the original Hugging Face module
(``AttentionBridge.forward`` itself) get no hook, since the original module reads ``cache``. The
hook changes which object the bridge reads, never a tensor, so outputs are unchanged wherever the
cache was already found. :func:`lens_safety.selfcheck.check_generation` verifies the result
against vanilla transformers at run time.
"""

from __future__ import annotations

from typing import Any

import torch

#: keyword names under which the bridge's reimplemented attention looks for the KV cache
BRIDGE_CACHE_NAMES = ("past_key_values", "layer_past")


def _alias_cache(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    cache = kwargs.get("cache")
    if cache is None or any(kwargs.get(name) is not None for name in BRIDGE_CACHE_NAMES):
        return None
    return args, {**kwargs, "past_key_values": cache}


def reimplements_attention(module: torch.nn.Module) -> bool:
    """Whether ``module`` is an attention bridge that computes attention itself (and reads the cache)."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    return isinstance(module, AttentionBridge) and type(module).forward is not AttentionBridge.forward


def install_cache_alias(bridge: Any) -> int:
    """Register the cache-alias pre-hook on every reimplementing attention bridge; return how many.

    Idempotent: a module that already carries the hook is skipped.
    """
    installed = 0
    for module in bridge.original_model.modules():
        if not reimplements_attention(module) or getattr(module, "_lens_safety_cache_alias", False):
            continue
        module.register_forward_pre_hook(_alias_cache, with_kwargs=True)
        module._lens_safety_cache_alias = True
        installed += 1
    return installed
