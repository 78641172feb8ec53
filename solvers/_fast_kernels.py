"""Inner loops of the exact routing method ``fast`` (see :mod:`moebalance.solvers.routing_fast`).

Plain Python functions, compiled by numba when it is installed (:func:`kernels`); without numba the very same
code runs as Python: exactly as correct, much slower. numba because these loops move single tokens between
experts (the auction), walk shortest paths one unit at a time over a dense E x E graph and patch a few entries
per step, and select order statistics over short lists: nothing numpy can vectorise.

State shared by the steps: ``s`` [T, E] the scores shifted per row; q [E] the prices; ``sel`` [T, k] each
token's held experts, always a top-k of its full row of ``s - q`` (``held`` [T, E] their membership); ``lst``
[T, M] / ``lstv`` / ``nl`` [T] each token's list of experts it does not hold, with their scores, and ``bound``
[T]: while prices only rise, no expert outside the list is worth more to the token than the bound.

One private module per step (:data:`MODULES`): ``_fast_select`` (order statistics), ``_fast_prices`` (the
Jacobi steps and the first pass: :func:`prepare`, :func:`relist`), ``_fast_auction`` (:func:`auction`),
``_fast_candidates`` (the candidate lists the driver widens), ``_fast_arcs`` (the paths' graph, patched as
tokens move), ``_fast_certificate`` (the certificate) and ``_fast_paths`` (:func:`ssp`); their return codes
are in ``_fast_codes``. This module compiles them together and hands them out.

numba's disk cache (``cache=True``) is keyed by each function's own file: a loop compiled with a helper from
another file would not notice that file changing. Every compiled loop's cache therefore carries one stamp of
all the loops' files (:func:`source_stamp`), so that an edit to any of them recompiles them all.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import types

from . import (
    _fast_arcs,
    _fast_auction,
    _fast_candidates,
    _fast_certificate,
    _fast_codes,
    _fast_paths,
    _fast_prices,
    _fast_select,
)
from ._fast_auction import auction
from ._fast_candidates import add_best, candidates_from_lists, loads_of, top_k_of_candidates
from ._fast_certificate import violations
from ._fast_codes import BUDGET, BUILT, NEED_ROOM, NO_PATH, NOT_BUILT, OK, ROUNDS, STOPPED
from ._fast_paths import ssp
from ._fast_prices import prepare, relist

__all__ = [
    "kernels",
    "HAVE_NUMBA",
    "OK",
    "NO_PATH",
    "BUDGET",
    "NEED_ROOM",
    "ROUNDS",
    "STOPPED",
    "NOT_BUILT",
    "BUILT",
    "MODULES",
    "source_files",
    "source_stamp",
]

HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # imported only by kernels()

# the modules whose functions are compiled (every function defined in them), in the order they build on each other
MODULES = (_fast_select, _fast_prices, _fast_auction, _fast_candidates, _fast_arcs, _fast_certificate, _fast_paths)

# helpers inlined into their callers: a call that passes arrays costs two atomic reference counts per array, which
# dominated the auction's and the paths' inner loops; the other helpers are compiled apart and called
INLINE = frozenset(
    {
        "_push_desc",
        "_kth_smallest_small",
        "_top_values",
        "_top_row",
        "_best_alt",
        "_insert",
        "_pop_min",
        "_add_candidate",
    }
)

_PY = {
    "ssp": ssp,
    "prepare": prepare,
    "relist": relist,
    "auction": auction,
    "candidates": candidates_from_lists,
    "top_k": top_k_of_candidates,
    "violations": violations,
    "add_best": add_best,
    "loads": loads_of,
}
_COMPILED: dict | None = None
_DISPATCHERS: dict | None = None


def source_files() -> list[str]:
    """The files the compiled loops are built from: every module of :data:`MODULES` and the codes they return
    (numba freezes a global constant into the machine code)."""
    return [os.path.abspath(str(m.__file__)) for m in (*MODULES, _fast_codes)]


def source_stamp() -> bytes:
    """One digest of every file of :func:`source_files` (their names and contents): what each compiled loop's
    disk cache is stamped with, so that a change to any of the files recompiles every loop."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.digest()


def functions() -> dict[str, types.FunctionType]:
    """``{name: function}`` for every function defined in a module of :data:`MODULES` (names are unique across
    them: the compiled loops share one namespace)."""
    out: dict[str, types.FunctionType] = {}
    for mod in MODULES:
        for name, f in vars(mod).items():
            if isinstance(f, types.FunctionType) and f.__module__ == mod.__name__:
                if name in out:
                    raise RuntimeError(f"{name} is defined in both {out[name].__module__} and {mod.__name__}")
                out[name] = f
    return out


def _stamp_cache(dispatcher, stamp: bytes) -> None:
    """Stamp ``dispatcher``'s disk cache with :func:`source_stamp` instead of its own file's (numba's index keeps
    the stamp it was saved with and is ignored when it differs). Without these numba internals the cache stays
    keyed by the function's own file (tests/solvers/test_routing_fast_stops.py checks that the stamp is set)."""
    cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
    if cache_file is not None and hasattr(cache_file, "_source_stamp"):
        cache_file._source_stamp = stamp


def kernels(use_numba: bool = True) -> dict:
    """``{"ssp", "prepare", "relist", "auction", "candidates", "top_k", "violations", "add_best", "loads"}``:
    compiled by numba (cached on disk) when it is installed and ``use_numba``, else the plain Python
    functions."""
    global _COMPILED, _DISPATCHERS
    if not (use_numba and HAVE_NUMBA):
        return _PY
    if _COMPILED is None:
        import numba

        # the compiled functions call compiled helpers: they share one namespace in which every function of every
        # module is rebound to its compiled version
        ns: dict = {}
        for mod in MODULES:
            ns.update(vars(mod))
        ns["__name__"] = __name__
        stamp = source_stamp()

        def comp(f):
            g = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
            g.__module__, g.__qualname__, g.__doc__ = f.__module__, f.__qualname__, f.__doc__
            d = numba.njit(cache=True, nogil=True, inline="always" if f.__name__ in INLINE else "never")(g)
            _stamp_cache(d, stamp)
            return d

        compiled = {name: comp(f) for name, f in functions().items()}
        ns.update(compiled)
        _DISPATCHERS = compiled
        _COMPILED = {key: compiled[f.__name__] for key, f in _PY.items()}
    return _COMPILED


def dispatchers() -> dict:
    """``{name: numba dispatcher}`` for every function of :func:`functions`, after :func:`kernels` compiled them
    (empty before or without numba)."""
    return dict(_DISPATCHERS or {})
