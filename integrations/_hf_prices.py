"""The selection prices of an enabled transformers model in ``state_dict``, checkpoints and delayed init."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from moebalance.integrations._hf_block import _Block

PRICE_BUFFER = "moebalance_bias"

# ---------------------------------------------------------------------------------------------------------
# the prices in state_dict, checkpoints and delayed init
# ---------------------------------------------------------------------------------------------------------


def _check_prices(prices: Any, found: list) -> Any:
    """``prices``: "auto" | "zeros" | a list of ``[E]`` prices (one per MoE block, as :func:`biases` gives)."""
    if isinstance(prices, str):
        if prices not in ("auto", "zeros"):
            raise ValueError(f"`prices` must be 'auto', 'zeros' or a list of [E] tensors, got {prices!r}")
        return prices
    if not isinstance(prices, (list, tuple)) or len(prices) != len(found):
        raise ValueError(
            f"`prices` must be 'auto', 'zeros' or a list of {len(found)} [E] tensors (one per MoE "
            f"block), got {type(prices).__name__}"
        )
    out = []
    for i, ((_, _, router, _), q) in enumerate(zip(found, prices)):
        E = router.weight.shape[0]
        try:
            t = torch.as_tensor(np.asarray(q.detach().cpu() if isinstance(q, Tensor) else q, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"`prices`[{i}] must be a numeric [E={E}] array, got {type(q).__name__}") from None
        if t.shape != (E,) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"`prices`[{i}] must be a finite [E={E}] array, got shape {tuple(t.shape)}")
        out.append(t.float())
    return out


def _checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint directory or of a hub checkpoint already in the cache."""
    import json
    import os

    names = ("model.safetensors.index.json", "model.safetensors")
    found = {}
    for name in names:
        if os.path.isdir(path):
            f = os.path.join(path, name)
            found[name] = f if os.path.isfile(f) else None
        else:
            try:
                from transformers.utils import cached_file

                found[name] = cached_file(
                    path, name, local_files_only=True, _raise_exceptions_for_missing_entries=False
                )
            except Exception:  # not a hub name, or not cached: nothing to restore from
                found[name] = None
    if found[names[0]]:
        with open(found[names[0]]) as fh:
            shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
        return [os.path.join(os.path.dirname(found[names[0]]), f) for f in shards]
    return [found[names[1]]] if found[names[1]] else []


def _checkpoint_prices(model: nn.Module, blocks: list[_Block]) -> dict[int, Tensor]:
    """``{block index: [E] price}`` saved in the checkpoint ``model`` was loaded from (``save_pretrained`` of
    an enabled model), read without pickle; checkpoint names follow transformers' own renaming on save."""
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not path:
        return {}
    files = _checkpoint_files(path)
    if not files:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    want: dict[str, int] = {}
    for i, b in enumerate(blocks):
        key = f"{names[id(b.router)]}.{PRICE_BUFFER}"
        want[key] = i
        try:  # the name save_pretrained wrote (e.g. Mixtral's block_sparse_moe)
            from transformers.core_model_loading import revert_weight_conversion

            for saved in revert_weight_conversion(model, {key: torch.zeros(1)}):
                want[saved] = i
        except Exception:
            pass
    from safetensors import safe_open

    out: dict[int, Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in set(fh.keys()) & set(want):
                out[want[key]] = fh.get_tensor(key).float()
    return out


def _restore_prices(model: nn.Module, blocks: list[_Block], prices: Any) -> None:
    """Set each block's starting price: "auto" keeps a price the router already holds (DeepSeek-V3's correction
    bias; a ``moebalance_bias`` loaded by ``load_state_dict`` or kept by :func:`disable`), else the one in the
    checkpoint the model was loaded from, else zeros; "zeros"; or the given list."""
    if isinstance(prices, list):
        for b, q in zip(blocks, prices):
            b.set_price(q.to(b.router.weight.device))
        return
    if prices == "zeros":
        for b in blocks:
            if not b.router.weight.is_meta:
                b.set_price(torch.zeros(b.num_experts, device=b.router.weight.device))
        return
    fresh = [
        b
        for b in blocks
        if b.kind != "grouped_sigmoid"
        and not getattr(b.router, "_moebalance_kept", False)
        and not b.router.weight.is_meta
    ]
    if not fresh:
        return
    saved = _checkpoint_prices(model, blocks)
    for i, b in enumerate(blocks):
        if b in fresh and i in saved:
            q = saved[i]
            if q.shape != (b.num_experts,):
                raise ValueError(
                    f"the checkpoint's `{PRICE_BUFFER}` of {b.name} has shape {tuple(q.shape)}, the "
                    f"router has {b.num_experts} experts"
                )
            b.set_price(q.to(b.router.weight.device))


def _fill_missing_price(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict of a state dict without the price (a checkpoint saved before enable) keeps the price."""
    key = prefix + PRICE_BUFFER
    if key not in state_dict and PRICE_BUFFER in module._buffers:
        state_dict[key] = module._buffers[PRICE_BUFFER].detach().clone()


def _zero_price_init(original: Any) -> Any:
    def _init_weights(module: nn.Module) -> None:
        original(module)
        buf = module._buffers.get(PRICE_BUFFER) if isinstance(module, nn.Module) else None
        if buf is not None:
            from transformers import initialization as hf_init

            hf_init.zeros_(buf)

    return _init_weights


def _install_price_hooks(model: nn.Module, blocks: list[_Block]) -> None:
    """The model's own ``init_weights`` / ``_init_weights`` zero the price buffers (meta device, ``to_empty``);
    ``load_state_dict`` sets them (and keeps them when the state dict predates enable)."""
    for b in blocks:
        if PRICE_BUFFER in b.router._buffers:
            b.router._moebalance_kept = True
            if "_moebalance_load_hook" not in b.router.__dict__:
                b.router._moebalance_load_hook = b.router.register_load_state_dict_pre_hook(_fill_missing_price)
    for m in model.modules():
        if (
            hasattr(type(m), "_init_weights")
            and hasattr(m, "config")
            and not getattr(m, "_moebalance_init", False)
            and callable(getattr(m, "_init_weights", None))
        ):
            m._init_weights = _zero_price_init(m._init_weights)
            m._moebalance_init = True
