"""Problem and solution files: ``.npz`` and ``.json``, read without pickle (a file is data, never code).

Routing problem schema (both formats carry the same keys):
  kind      "routing"
  scores    [T, E] numbers
  k         int
  capacity  optional: an int or [E] ints (omit to use capacity_factor)
  capacity_factor  optional number (default 1.0); when given with ``capacity`` it must produce that capacity

Placement problem schema: kind "placement" plus the keys of ``PlacementProblem.to_dict()`` (expert_loads,
num_devices, home, cost, max_tokens_per_device, max_foreign_experts, alpha, min_chunk, imbalance_threshold);
``null`` keeps its meaning (``imbalance_threshold: null`` disables LLEP's fallback).

In ``.npz`` files the arrays are stored as arrays and every other key (numbers, strings, ``null``, the nested
``cost``) as one JSON string under ``meta_json``, so a problem saved and loaded is identical in both formats.

Files larger than :data:`moebalance._validate.MAX_FILE_BYTES` (uncompressed, for ``.npz``), JSON nested deeper
than :data:`MAX_JSON_DEPTH`, and a file that is not what its suffix says are refused with one ValueError line;
sizes inside a file are checked by the problem constructors before anything large is allocated.
"""

from __future__ import annotations

import io as _io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import MAX_FILE_BYTES
from .routing import RoutingProblem

__all__ = ["load_problem", "save_problem", "problem_from_dict", "problem_to_dict", "problem_text",
           "save_solution", "save_solution_text", "MAX_JSON_DEPTH"]

MAX_JSON_DEPTH = 32  # problem files nest 3 levels deep; deeper JSON is refused before it is turned into arrays

_ROUTING_KEYS = {"kind", "scores", "k", "capacity", "capacity_factor"}


def _depth(value: Any, limit: int) -> int:
    # iterative, so a nesting bomb cannot exhaust the stack
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            if d > limit:
                return d
            deepest = max(deepest, d)
            items = v.values() if isinstance(v, dict) else v
            stack.extend((c, d + 1) for c in items if isinstance(c, (list, dict)))
    return deepest


def problem_to_dict(problem: Any) -> dict[str, Any]:
    """The file schema of ``problem``: its ``to_dict()`` plus what it needs to load back identical."""
    d = dict(problem.to_dict())
    if d.get("kind") == "routing" and getattr(problem, "capacity_factor", None) is not None:
        d["capacity_factor"] = float(problem.capacity_factor)
    return d


def problem_from_dict(d: dict[str, Any], source: str = "problem") -> Any:
    """Build a problem from a schema dict; ValueError naming the missing or bad key."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected an object with a 'kind' key, got {type(d).__name__}")
    kind = d.get("kind", "routing")
    if kind == "routing":
        missing = [key for key in ("scores", "k") if key not in d]
        if missing:
            raise ValueError(f"{source}: routing problem lacks key(s) {', '.join(missing)}")
        unknown = set(d) - _ROUTING_KEYS
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        capacity, cf = d.get("capacity"), d.get("capacity_factor", 1.0)
        if capacity is not None and "capacity_factor" in d and cf is not None:
            # written by save_problem: the capacity came from the factor; rebuild it so and check it agrees
            problem = RoutingProblem(d["scores"], d["k"], capacity_factor=cf)
            if not np.array_equal(problem.capacity, np.broadcast_to(np.asarray(capacity), problem.capacity.shape)):
                raise ValueError(f"{source}: `capacity` disagrees with `capacity_factor`={cf!r}")
            return problem
        return RoutingProblem(d["scores"], d["k"], capacity=capacity, capacity_factor=1.0 if cf is None else cf)
    if kind == "placement":
        from .placement import PlacementProblem

        return PlacementProblem.from_dict(d)
    raise ValueError(f"{source}: 'kind' must be 'routing' or 'placement', got {kind!r}")


def _npz_to_dict(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        hint = " (it is a .npy array)" if magic[:4] == b"\x93NUM" else ""
        raise ValueError(f"not an .npz archive{hint}")
    with zipfile.ZipFile(path) as zf:  # sizes from the archive's directory, before anything is decompressed
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        if total > MAX_FILE_BYTES or len(infos) > 64:
            raise ValueError(f"{len(infos)} arrays of {total} bytes uncompressed; the limit is 64 arrays and "
                             f"{MAX_FILE_BYTES} bytes")
    out: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as z:
        files = list(z.files)
        if "meta_json" in files:
            meta = json.loads(str(z["meta_json"]))
            if not isinstance(meta, dict) or _depth(meta, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
                raise ValueError("`meta_json` must be a shallow JSON object")
            out.update(meta)
        for key in files:
            if key == "meta_json":
                continue
            v = z[key]
            if key == "cost_json":  # files written before meta_json
                out["cost"] = json.loads(str(v))
            elif v.ndim == 0:
                out[key] = v.item()
            else:
                out[key] = v
    if isinstance(out.get("kind"), bytes):
        out["kind"] = out["kind"].decode()
    return out


def load_problem(path: str | os.PathLike) -> Any:
    """Read a ``.npz`` or ``.json`` problem file (never with pickle); every failure is one ValueError line."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`path` {str(p)!r} is not a file")
    if p.suffix not in (".npz", ".json"):
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{p.name}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit of a problem file")
    try:
        if p.suffix == ".npz":
            d = _npz_to_dict(p)
        else:
            d = json.loads(p.read_text(encoding="utf-8"))
            if _depth(d, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    except RecursionError:
        raise ValueError(f"{p.name}: cannot read problem file: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p.name}: cannot read problem file: {str(exc).splitlines()[0]}") from None
    except (OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{p.name}: cannot read problem file: {exc}") from None
    return problem_from_dict(d, source=p.name)


def problem_text(problem: Any, suffix: str) -> bytes:
    """The bytes of ``problem``'s file in the format named by ``suffix`` (".npz" or ".json")."""
    d = problem_to_dict(problem)
    if suffix == ".json":
        return json.dumps(d, allow_nan=False).encode("utf-8")
    if suffix == ".npz":
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for key, v in d.items():
            if isinstance(v, (list, np.ndarray)):
                arrays[key] = np.asarray(v)
            else:
                meta[key] = v
        arrays["meta_json"] = np.array(json.dumps(meta, allow_nan=False))
        buf = _io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()
    raise ValueError(f"`path` must end in .npz or .json, got suffix {suffix!r}")


def save_problem(problem: Any, path: str | os.PathLike) -> Path:
    """Write ``problem`` to ``.npz`` or ``.json`` following the schema above."""
    p = Path(path)
    if p.suffix not in (".npz", ".json"):
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    p.write_bytes(problem_text(problem, p.suffix))
    return p


def save_solution_text(solution: Any) -> str:
    """A :class:`Solution` as JSON text."""
    return json.dumps(solution.to_dict(), indent=1)


def save_solution(solution: Any, path: str | os.PathLike) -> Path:
    """Write a :class:`Solution` as JSON."""
    p = Path(path)
    p.write_text(save_solution_text(solution))
    return p
