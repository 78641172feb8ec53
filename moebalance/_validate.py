"""Input validation shared by the problem classes: every message names the argument."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

__all__ = ["as_float_array", "as_int_array", "as_int"]


def _to_numpy(value: Any) -> np.ndarray:
    # torch tensors (any dtype, any device) without importing torch here
    if type(value).__module__.startswith("torch"):
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.double()
        return value.numpy()
    return np.asarray(value)


def as_float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    """A finite float64 copy of ``value`` with exactly ``ndim`` dimensions, else ValueError naming ``name``."""
    try:
        arr = _to_numpy(value)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"`{name}` must be a numeric {ndim}-D array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"`{name}` must be a numeric {ndim}-D array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D array, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=True)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite: it contains NaN or inf")
    return arr


def as_int_array(value: Any, name: str, shape: tuple[int, ...], *, minimum: int = 0) -> np.ndarray:
    """An int64 copy of ``value`` of the given shape with integer entries >= ``minimum``."""
    try:
        arr = _to_numpy(value)
    except Exception as exc:
        raise ValueError(f"`{name}` must be an integer array of shape {shape}: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"`{name}` must be an integer array, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` must be finite integers: it contains NaN or inf")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"`{name}` must hold integers, got non-integer values")
    out = arr.astype(np.int64)
    if out.size and out.min() < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got minimum {out.min()}")
    return out


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python int from an integral ``value`` (bools rejected), bounds checked, else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"`{name}` must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}")
    return value
