"""Expert-load traces: per-step, per-layer expert loads recorded from a model, in one documented file format.

A trace is what :class:`moebalance.integrations.transformers.LoadRecorder` writes and what the placement and
replication problems read (this module imports neither torch nor transformers).

File format (``.npz`` or ``.json``; the same keys in both, read without pickle):

  kind        "expert_loads"
  loads       ``[B, L, E]`` non-negative integers: token-expert pairs routed to expert e of MoE layer l in step
              b (every top-k slot, global over the expert-parallel group)
  tokens      ``[B]`` integers: tokens routed in step b (each layer routes ``tokens[b] * top_k`` pairs)
  top_k       int
  layers      ``[L]`` strings: the MoE blocks' module names
  model_type  string (the model's ``config.model_type``; "" when unknown)

A step is one forward of the model. ``loads[b, l]`` is a :class:`~moebalance.PlacementProblem`'s
``expert_loads`` (:meth:`LoadTrace.placement_problem`); ``loads`` itself, or a window of it, is the ``[B, L, E]``
``weight`` of the replication problem (:meth:`LoadTrace.window`); ``loads.sum(0)`` is EPLB's ``[L, E]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["LoadTrace", "read_trace", "TRACE_KIND"]

TRACE_KIND = "expert_loads"


@dataclass(frozen=True)
class LoadTrace:
    """Expert loads over ``B`` steps: ``loads [B, L, E]`` int64, ``tokens [B]``, ``top_k``, ``layers [L]``."""

    loads: np.ndarray
    tokens: np.ndarray
    top_k: int
    layers: tuple = field(default=())
    model_type: str = ""

    def __post_init__(self) -> None:
        loads = np.asarray(self.loads)
        if loads.ndim != 3 or loads.dtype.kind not in "iu" or (loads.size and loads.min() < 0):
            raise ValueError(f"`loads` must be a [B, L, E] array of non-negative integers, got {loads.dtype} "
                             f"of shape {loads.shape}")
        tokens = np.asarray(self.tokens)
        if tokens.shape != (loads.shape[0],) or tokens.dtype.kind not in "iu":
            raise ValueError(f"`tokens` must be [B={loads.shape[0]}] integers, got shape {tokens.shape}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 1:
            raise ValueError(f"`top_k` must be an integer >= 1, got {self.top_k!r}")
        layers = tuple(str(s) for s in self.layers) or tuple(f"layer{i}" for i in range(loads.shape[1]))
        if len(layers) != loads.shape[1]:
            raise ValueError(f"`layers` must name the {loads.shape[1]} layers, got {len(layers)} names")
        if loads.size and not np.array_equal(loads.sum(axis=2), np.repeat(tokens[:, None] * self.top_k,
                                                                          loads.shape[1], axis=1)):
            raise ValueError("`loads` must add up to tokens * top_k pairs in every step and layer")
        object.__setattr__(self, "loads", loads.astype(np.int64))
        object.__setattr__(self, "tokens", tokens.astype(np.int64))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "layers", layers)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, L, E)``."""
        return tuple(self.loads.shape)  # type: ignore[return-value]

    def window(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """``[b, L, E]`` loads of steps ``start:stop`` (the replication problem's window of recent batches)."""
        return self.loads[start:stop]

    def placement_problem(self, step: int = -1, layer: int = 0, num_devices: int = 2, **options: Any) -> Any:
        """The :class:`~moebalance.PlacementProblem` of one step and layer (``options`` go to the problem)."""
        from moebalance import PlacementProblem

        return PlacementProblem(self.loads[step, layer], num_devices, **options)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": TRACE_KIND, "loads": self.loads.tolist(), "tokens": self.tokens.tolist(),
                "top_k": self.top_k, "layers": list(self.layers), "model_type": self.model_type}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.npz`` or ``.json`` (the format in the module docstring)."""
        p = Path(path)
        if p.suffix == ".json":
            p.write_text(json.dumps(self.to_dict()))
        elif p.suffix == ".npz":
            np.savez_compressed(p, kind=np.array(TRACE_KIND), loads=self.loads, tokens=self.tokens,
                                top_k=np.array(self.top_k), layers=np.array(self.layers, dtype=str),
                                model_type=np.array(self.model_type))
        else:
            raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
        return p


def read_trace(path: str | os.PathLike) -> LoadTrace:
    """Read a trace written by :meth:`LoadTrace.save` (never with pickle); ValueError naming a bad key."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`path` {str(p)!r} is not a file")
    if p.suffix == ".json":
        d = json.loads(p.read_text())
    elif p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            d = {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    else:
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    if not isinstance(d, dict) or d.get("kind") != TRACE_KIND:
        raise ValueError(f"{p.name}: not an expert-load trace (key 'kind' must be {TRACE_KIND!r})")
    missing = [k for k in ("loads", "tokens", "top_k") if k not in d]
    if missing:
        raise ValueError(f"{p.name}: trace lacks key(s) {', '.join(missing)}")
    loads = np.asarray(d["loads"])
    if loads.size == 0:
        loads = loads.reshape(0, len(d.get("layers", [])), 0).astype(np.int64)
    return LoadTrace(loads, np.asarray(d["tokens"], dtype=np.int64), int(d["top_k"]),
                     tuple(np.asarray(d.get("layers", [])).tolist()), str(d.get("model_type", "")))
