"""Input validation shared by the problem classes: every message names the argument.

Size and value limits, checked before anything of that size is allocated:

- :data:`MAX_ELEMENTS` entries in one ``[T, E]`` score array or ``[E, P]`` assignment (2**27: 1 GiB as float64);
- :data:`MAX_EXPERTS` experts and :data:`MAX_DEVICES` devices (2**20 each);
- :data:`MAX_INT`: every integer (counts, capacities, loads and their sum) is below 2**53, so it is exact in
  float64 and no int64 sum can wrap;
- :data:`MAX_MAGNITUDE`: every real value (score, cost) has ``|v| <= 1e100``, so sums and products with up to
  2**53 tokens stay finite;
- :data:`MAX_FACTOR`: a multiplicative setting (capacity factor, LLEP's alpha and imbalance threshold) is at most
  1e6;
- :data:`MAX_FILE_BYTES`: a problem file holds at most 2 GiB (uncompressed).

Refused everywhere: bool, complex, timedelta/datetime and string values where numbers are expected.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = [
    "as_float_array",
    "as_int_array",
    "as_int",
    "as_real",
    "check_elements",
    "MAX_ELEMENTS",
    "MAX_EXPERTS",
    "MAX_DEVICES",
    "MAX_INT",
    "MAX_MAGNITUDE",
    "MAX_FACTOR",
    "MAX_FILE_BYTES",
]

MAX_ELEMENTS = 2**27
MAX_EXPERTS = 2**20
MAX_DEVICES = 2**20
MAX_INT = 2**53
MAX_MAGNITUDE = 1e100
MAX_FACTOR = 1e6
MAX_FILE_BYTES = 2**31
# registered as numbers.Integral by numpy, yet no count: bools and time spans
_NOT_NUMBERS = (bool, np.bool_, np.timedelta64, np.datetime64)


def check_elements(name: str, *dims: int) -> None:
    """ValueError naming ``name`` when an array of shape ``dims`` would exceed :data:`MAX_ELEMENTS` entries."""
    n = math.prod(int(d) for d in dims)  # Python ints: no overflow
    if n > MAX_ELEMENTS:
        raise ValueError(
            f"`{name}` would hold {' x '.join(map(str, dims))} = {n} entries, over the limit of "
            f"{MAX_ELEMENTS} (moebalance._validate.MAX_ELEMENTS)"
        )


def _to_numpy(value: Any, name: str) -> np.ndarray:
    # torch tensors (any dtype, any device) without importing torch here
    if type(value).__module__.startswith("torch"):
        if value.is_complex():
            raise ValueError(f"`{name}` must be real, got a complex tensor")
        check_elements(name, *value.shape)
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.double()
        return value.numpy()
    if isinstance(value, (str, bytes)):
        raise ValueError(f"`{name}` must be numeric, got a string")
    if isinstance(value, np.ndarray):
        check_elements(name, *value.shape)
    return np.asarray(value)


def _numeric(arr: np.ndarray, name: str, what: str) -> None:
    if arr.dtype == bool:
        raise ValueError(f"`{name}` must be {what}, got booleans")
    if arr.dtype.kind in "mM":  # numpy files timedelta64 under the integers
        raise ValueError(f"`{name}` must be {what}, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must be real, got dtype {arr.dtype}")
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"`{name}` must be {what}, got dtype {arr.dtype}")


def as_float_array(value: Any, name: str, ndim: int, *, max_abs: float = MAX_MAGNITUDE) -> np.ndarray:
    """A finite float64 copy of ``value`` with exactly ``ndim`` dimensions, else ValueError naming ``name``."""
    try:
        arr = _to_numpy(value, name)
    except ValueError as exc:
        if str(exc).startswith(f"`{name}`"):
            raise
        raise ValueError(f"`{name}` must be a numeric {ndim}-D array: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # ragged or too deeply nested lists and the like
        raise ValueError(f"`{name}` must be a numeric {ndim}-D array: {type(exc).__name__}") from None
    _numeric(arr, name, f"a numeric {ndim}-D array")
    if arr.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D array, got shape {arr.shape}")
    check_elements(name, *arr.shape)
    arr = arr.astype(np.float64, copy=True)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite: it contains NaN or inf")
    if arr.size and float(np.abs(arr).max()) > max_abs:
        raise ValueError(f"`{name}` must have |values| <= {max_abs:g}, got {float(np.abs(arr).max()):g}")
    return arr


def as_int_array(
    value: Any, name: str, shape: tuple[int, ...], *, minimum: int = 0, maximum: int = MAX_INT
) -> np.ndarray:
    """An int64 copy of ``value`` of the given shape with integer entries in ``[minimum, maximum]``."""
    try:
        arr = _to_numpy(value, name)
    except ValueError as exc:
        if str(exc).startswith(f"`{name}`"):
            raise
        raise ValueError(f"`{name}` must be an integer array of shape {shape}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise ValueError(f"`{name}` must be an integer array of shape {shape}: {type(exc).__name__}") from None
    _numeric(arr, name, "an integer array")
    if arr.shape != shape:
        raise ValueError(f"`{name}` must have shape {shape}, got {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)  # float16/32 compared with 2**53 would overflow the comparison's cast
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` must be finite integers: it contains NaN or inf")
        if not np.all(arr == np.round(arr)):
            raise ValueError(f"`{name}` must hold integers, got non-integer values")
        if arr.size and (arr.max() > maximum or arr.min() < minimum):  # before the cast can wrap
            bad = arr.max() if arr.max() > maximum else arr.min()
            raise ValueError(f"`{name}` must lie in [{minimum}, {maximum}], got {bad:g}")
    elif arr.dtype == np.uint64 and arr.size and int(arr.max()) > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {int(arr.max())}")
    out = arr.astype(np.int64)
    if out.size and out.min() < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got minimum {out.min()}")
    if out.size and out.max() > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got maximum {out.max()}")
    return out


def as_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = MAX_INT) -> int:
    """A Python int from an integral ``value`` (bools, strings, complex rejected), bounds checked.

    ``maximum`` defaults to :data:`MAX_INT`; pass None for no upper bound.
    """
    if isinstance(value, _NOT_NUMBERS) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        v = float(value)
        if not v.is_integer():
            raise ValueError(f"`{name}` must be an integer, got {value!r}")
        value = int(v)
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"`{name}` must be <= {maximum}, got {value}")
    return value


def as_real(
    value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None, positive: bool = False
) -> float:
    """A finite Python float from a real number (bools, strings, complex, timedelta rejected), bounds checked."""
    if isinstance(value, _NOT_NUMBERS) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"`{name}` must be >= {minimum:g}, got {value!r}")
    if maximum is not None and v > maximum:
        raise ValueError(f"`{name}` must be <= {maximum:g}, got {value!r}")
    return v
