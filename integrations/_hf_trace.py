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

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        from moebalance._validate import MAX_INT, as_int, check_elements

        loads = _int_array(self.loads, "loads", 3)
        B, L, E = loads.shape
        tokens = _int_array(self.tokens, "tokens", 1)
        if tokens.shape != (B,):
            raise ValueError(f"`tokens` must have shape [B={B}], got {tokens.shape}")
        top_k = as_int(self.top_k, "top_k", minimum=1, maximum=E if E else MAX_INT)
        if tokens.size and int(tokens.max()) * top_k > MAX_INT:  # Python ints: no wrap
            raise ValueError(f"`tokens` * `top_k` must stay <= {MAX_INT}, got {int(tokens.max())} * {top_k}")
        if isinstance(self.layers, (str, bytes)):
            raise ValueError(f"`layers` must be a list of {L} names, got a single string")
        try:
            names = list(self.layers)
        except TypeError:
            raise ValueError(f"`layers` must be a list of {L} names, got {type(self.layers).__name__}") from None
        check_elements("layers", len(names))
        if not all(isinstance(n, (str, np.str_)) for n in names):
            raise ValueError("`layers` must hold strings (the MoE blocks' module names)")
        layers = tuple(str(n) for n in names) or tuple(f"layer{i}" for i in range(L))
        if len(layers) != L:
            raise ValueError(f"`layers` must name the {L} layers, got {len(layers)} names")
        if not isinstance(self.model_type, (str, np.str_)):
            raise ValueError(f"`model_type` must be a string, got {type(self.model_type).__name__}")
        # every sum is at most E * MAX_INT < 2**73: checked in float64 before an int64 sum could wrap
        if loads.size and float(loads.astype(np.float64).sum(axis=2).max()) > MAX_INT:
            raise ValueError(f"`loads` must add up to at most {MAX_INT} pairs per step and layer")
        if loads.size and not np.array_equal(loads.sum(axis=2), np.repeat(tokens[:, None] * top_k, L, axis=1)):
            b, l = np.argwhere(loads.sum(axis=2) != tokens[:, None] * top_k)[0]
            raise ValueError(
                f"`loads` must add up to tokens * top_k pairs in every step and layer: step {b}, "
                f"layer {l} has {int(loads[b, l].sum())}, expected {int(tokens[b]) * top_k}"
            )
        object.__setattr__(self, "loads", loads)
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "model_type", str(self.model_type))

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, L, E)``."""
        return tuple(self.loads.shape)  # type: ignore[return-value]

    def window(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """``[b, L, E]`` loads of steps ``start:stop`` (the replication problem's window of recent batches)."""
        return self.loads[start:stop]

    def placement_problem(self, step: int = -1, layer: int = 0, num_devices: int = 2, **options: Any) -> Any:
        """The :class:`~moebalance.PlacementProblem` of one step and layer (``options`` go to the problem)."""
        from moebalance import PlacementProblem

        return PlacementProblem(self.loads[step, layer], num_devices, **options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": TRACE_KIND,
            "loads": self.loads.tolist(),
            "tokens": self.tokens.tolist(),
            "top_k": self.top_k,
            "layers": list(self.layers),
            "model_type": self.model_type,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``.npz`` or ``.json`` (the format in the module docstring), atomically, with the umask's mode."""
        from moebalance.io import write_atomic

        p = Path(path)
        if p.suffix == ".json":
            return write_atomic(p, json.dumps(self.to_dict()))
        if p.suffix == ".npz":
            buf = io.BytesIO()
            np.savez_compressed(
                buf,
                kind=np.array(TRACE_KIND),
                loads=self.loads,
                tokens=self.tokens,
                top_k=np.array(self.top_k),
                layers=np.array(self.layers, dtype=str),
                model_type=np.array(self.model_type),
            )
            return write_atomic(p, buf.getvalue())
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")


_KEYS = {"kind", "loads", "tokens", "top_k", "layers", "model_type"}


def _int_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """``value`` as an int64 array of ``ndim`` dimensions holding integers in [0, MAX_INT] (no silent casts)."""
    from moebalance._validate import MAX_INT, as_int_array, check_elements

    if isinstance(value, (list, tuple)):
        try:
            arr = np.asarray(value) if value else np.zeros((0,) * ndim, dtype=np.int64)
        except (ValueError, OverflowError, TypeError):
            raise ValueError(
                f"`{name}` must be a {ndim}-D array of non-negative integers (ragged or not numbers)"
            ) from None
    else:
        arr = value if isinstance(value, np.ndarray) else np.asarray(value)
    if arr.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D array of non-negative integers, got shape {arr.shape}")
    check_elements(name, *arr.shape)
    if arr.dtype == object:  # Python ints too large for int64
        raise ValueError(f"`{name}` must hold integers <= {MAX_INT}")
    return as_int_array(arr, name, arr.shape, minimum=0)


def read_trace(path: str | os.PathLike) -> LoadTrace:
    """Read a trace written by :meth:`LoadTrace.save` (never with pickle).

    Every failure (a truncated or corrupt file, a wrong dtype or shape, an array where a scalar belongs, a
    fractional ``top_k``, negative counts, loads that do not add up, huge headers) is one ValueError line that
    starts with the file's name and names the key.
    """
    from moebalance.io import read_json, read_npz

    p = Path(path)
    if p.suffix not in (".json", ".npz"):
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    d = read_json(p) if p.suffix == ".json" else read_npz(p)
    try:
        return _trace_from_dict(d)
    except ValueError as exc:
        raise ValueError(f"{p.name}: {str(exc).splitlines()[0] if str(exc) else 'bad trace'}") from None
    except (TypeError, OverflowError) as exc:  # the validators above should leave none; never a traceback
        raise ValueError(f"{p.name}: malformed trace: {type(exc).__name__}: {exc}") from None


def _trace_from_dict(d: Any) -> LoadTrace:
    kind = d.get("kind") if isinstance(d, dict) else None
    if not isinstance(kind, str) or kind != TRACE_KIND:
        raise ValueError(f"not an expert-load trace (key 'kind' must be {TRACE_KIND!r})")
    missing = [k for k in ("loads", "tokens", "top_k") if k not in d]
    if missing:
        raise ValueError(f"trace lacks key(s) {', '.join(missing)}")
    unknown = sorted(set(d) - _KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; a trace holds {', '.join(sorted(_KEYS))}")
    layers = d.get("layers", [])
    if isinstance(layers, np.ndarray):
        if layers.dtype.kind != "U" or layers.ndim != 1:
            raise ValueError(f"`layers` must be a list of names, got {layers.dtype} of shape {layers.shape}")
        layers = layers.tolist()
    elif not isinstance(layers, list):
        raise ValueError(f"`layers` must be a list of names, got {type(layers).__name__}")
    loads = d["loads"]
    if isinstance(loads, list) and not loads:
        loads = np.zeros((0, len(layers), 0), dtype=np.int64)
    return LoadTrace(loads, d["tokens"], d["top_k"], tuple(layers), d.get("model_type", ""))
