"""Problem and solution files: ``.npz`` and ``.json``, read without pickle (a file is data, never code).

Routing problem schema (both formats carry the same keys):
  kind      "routing"
  scores    [T, E] numbers
  k         int
  capacity  optional: an int or [E] ints (omit to use capacity_factor)
  capacity_factor  optional number (default 1.0), used when capacity is absent

Placement problem schema: kind "placement" plus the keys of ``PlacementProblem.to_dict()`` (expert_loads,
num_devices, home, cost, limits, alpha, min_chunk, imbalance_threshold); in ``.npz`` files the nested ``cost``
is stored as a JSON string under ``cost_json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .routing import RoutingProblem

__all__ = ["load_problem", "save_problem", "problem_from_dict", "save_solution"]


def problem_from_dict(d: dict[str, Any], source: str = "problem") -> Any:
    """Build a problem from a schema dict; ValueError naming the missing or bad key."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected an object with a 'kind' key, got {type(d).__name__}")
    kind = d.get("kind", "routing")
    if kind == "routing":
        missing = [key for key in ("scores", "k") if key not in d]
        if missing:
            raise ValueError(f"{source}: routing problem lacks key(s) {', '.join(missing)}")
        unknown = set(d) - {"kind", "scores", "k", "capacity", "capacity_factor"}
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}")
        return RoutingProblem(d["scores"], d["k"], capacity=d.get("capacity"),
                              capacity_factor=d.get("capacity_factor", 1.0))
    if kind == "placement":
        from .placement import PlacementProblem

        return PlacementProblem.from_dict(d)
    raise ValueError(f"{source}: 'kind' must be 'routing' or 'placement', got {kind!r}")


def _npz_to_dict(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            v = z[key]
            if key == "cost_json":
                out["cost"] = json.loads(str(v))
            elif v.ndim == 0:
                out[key] = v.item()
            else:
                out[key] = v
    if isinstance(out.get("kind"), bytes):
        out["kind"] = out["kind"].decode()
    return out


def load_problem(path: str | os.PathLike) -> Any:
    """Read a ``.npz`` or ``.json`` problem file (never with pickle)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"`path` {str(p)!r} is not a file")
    try:
        if p.suffix == ".npz":
            d = _npz_to_dict(p)
        elif p.suffix == ".json":
            d = json.loads(p.read_text())
        else:
            raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    except ValueError as exc:
        if str(exc).startswith("`path`"):
            raise
        raise ValueError(f"{p.name}: cannot read problem file: {exc}") from None
    except (OSError, KeyError, EOFError) as exc:
        raise ValueError(f"{p.name}: cannot read problem file: {exc}") from None
    return problem_from_dict(d, source=p.name)


def save_problem(problem: Any, path: str | os.PathLike) -> Path:
    """Write ``problem`` to ``.npz`` or ``.json`` following the schema above."""
    p = Path(path)
    d = problem.to_dict()
    if p.suffix == ".json":
        p.write_text(json.dumps(d))
    elif p.suffix == ".npz":
        arrays = {}
        for key, v in d.items():
            if isinstance(v, dict):
                arrays[f"{key}_json"] = np.array(json.dumps(v))
            elif v is None:
                continue
            else:
                arrays[key] = np.asarray(v)
        np.savez_compressed(p, **arrays)
    else:
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    return p


def save_solution(solution: Any, path: str | os.PathLike) -> Path:
    """Write a :class:`Solution` as JSON."""
    p = Path(path)
    p.write_text(json.dumps(solution.to_dict(), indent=1))
    return p
