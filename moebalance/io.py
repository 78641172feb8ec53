"""Problem, solution and array files: ``.npz`` and ``.json``, read without pickle (a file is data, never code).

Every family is stored the same way: its file schema (``Family.to_dict``, by default the problem's ``to_dict()``,
with ``kind`` first), read back with ``Family.from_dict`` (by default the problem class's ``from_dict``). The
schemas live in each family's ``io`` module (``moebalance.routing.io``, ``moebalance.placement.io``,
``moebalance.replication.io``); io knows nothing else of a family: :data:`FORMATS` is a read-only view of what
the declared families (:mod:`moebalance.family`) say.

In ``.npz`` files the arrays are stored as arrays and every other key (numbers, strings, ``null``, the nested
``cost``) as one JSON string under ``meta_json``, so a problem saved and loaded is identical in both formats.

What a reader refuses, always with one ``ValueError`` line naming the file and the field: a file that is not
what its suffix says, truncated or corrupt archives, more than :data:`MAX_ARRAYS` arrays or more than
:data:`moebalance._validate.MAX_FILE_BYTES` bytes (uncompressed, from the archive's directory, before anything
is decompressed), an array whose header promises more data than its archive member holds, headers over
:data:`MAX_HEADER_BYTES`, object or structured arrays (they would need pickle), JSON nested deeper than
:data:`MAX_JSON_DEPTH` or with a key given twice; the problem constructors then check every value (types,
shapes, integers, signs, sizes) before anything large is allocated.

Files are written atomically (a temporary file in the same folder, renamed into place) with the mode a new
file gets from the umask (``0o666 & ~umask``), not the temporary file's 0600.
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import math
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._validate import MAX_FILE_BYTES
from .family import ARRAY_OF_INTS, AS_READ, Family, all_families, family_named, family_of

__all__ = [
    "load_problem",
    "save_problem",
    "problem_from_dict",
    "problem_to_dict",
    "problem_text",
    "save_solution",
    "save_solution_text",
    "load_solution",
    "read_npz",
    "read_json",
    "write_atomic",
    "FORMATS",
    "MAX_JSON_DEPTH",
    "MAX_ARRAYS",
    "MAX_HEADER_BYTES",
]

MAX_JSON_DEPTH = 32  # problem files nest 3 levels deep; deeper JSON is refused before it is turned into arrays
MAX_ARRAYS = 64  # arrays in one .npz file
MAX_HEADER_BYTES = 10_000  # numpy's own default limit on an .npy header


# ---- the table of families ----------------------------------------------------------------------------------
class _Formats(Mapping):
    """``{kind: (problem -> schema dict, schema dict -> problem)}`` of every declared family (read-only)."""

    def __getitem__(self, kind: str) -> tuple[Callable[[Any], dict], Callable[[dict], Any]]:
        fam = family_named(kind)
        if fam is None:
            raise KeyError(kind)
        return fam.to_dict, fam.read_problem

    def __iter__(self) -> Iterator[str]:
        return iter(all_families())

    def __len__(self) -> int:
        return len(all_families())


# kind -> (problem -> schema dict, schema dict -> problem), from the families' declarations
FORMATS: Mapping[str, tuple[Callable[[Any], dict], Callable[[dict], Any]]] = _Formats()


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


def _family_of_problem(problem: Any) -> Family:
    fam = None if isinstance(problem, type) else family_of(problem)
    if fam is None or not isinstance(problem, fam.problem):
        names = ", ".join(f.problem.__name__ for f in all_families().values())
        raise ValueError(f"`problem` must be a problem object ({names}), got {type(problem).__name__}")
    return fam


def problem_to_dict(problem: Any) -> dict[str, Any]:
    """The file schema of ``problem``: everything it needs to load back identical, ``kind`` included."""
    fam = _family_of_problem(problem)
    d = dict(fam.to_dict(problem))
    d["kind"] = fam.name
    return d


def problem_from_dict(d: dict[str, Any], source: str = "problem") -> Any:
    """Build a problem from a schema dict; ValueError ``"{source}: ..."`` naming the key.

    A dict without ``kind`` is read as the family that declares ``untagged_files`` (routing: its first files
    had no ``kind``)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected an object with a 'kind' key, got {type(d).__name__}")
    families = all_families()
    untagged = next((f.name for f in families.values() if f.untagged_files), None)
    kind = d.get("kind", untagged)
    fam = families.get(kind) if isinstance(kind, str) else None
    if fam is None:
        raise ValueError(f"{source}: 'kind' must be one of {', '.join(map(repr, families))}, got {kind!r:.80}")
    try:
        return fam.read_problem(d)
    except ValueError as exc:  # InfeasibleError included: its type is kept
        raise type(exc)(f"{source}: {_first_line(exc)}") from None
    except (TypeError, OverflowError, KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"{source}: malformed {kind} problem: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0][:500] if text else type(exc).__name__


# ---- readers ------------------------------------------------------------------------------------------------
def _check_path(path: str | os.PathLike, suffixes: tuple[str, ...] = (".npz", ".json")) -> Path:
    try:
        p = Path(path)
    except TypeError:
        raise ValueError(f"`path` must be a file path, got {path!r:.80}") from None
    if not p.is_file():
        raise ValueError(f"`path` {str(p)!r} is not a file")
    if p.suffix not in suffixes:
        raise ValueError(f"`path` must end in {' or '.join(suffixes)}, got {p.name!r}")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{p.name}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit of a file")
    return p


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _json_text(text: str | bytes, where: str) -> Any:
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError(f"{where}: cannot read: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read: not valid JSON: {_first_line(exc)}") from None
    if _depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path`` (size, depth and duplicate keys checked); ValueError naming the file."""
    p = _check_path(path, (".json",))
    try:
        return _json_text(p.read_bytes(), p.name)
    except OSError as exc:
        raise ValueError(f"{p.name}: cannot read: {exc}") from None


def _member_header(fh: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh, max_header_size=MAX_HEADER_BYTES)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = fmt.read_array_header_2_0(fh, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, struct.error) as exc:
        raise ValueError(f"`{key}` has a bad .npy header: {_first_line(exc)}") from None
    return shape, dtype


def read_npz(path: str | os.PathLike) -> dict[str, Any]:
    """The arrays of an ``.npz`` file, never with pickle; 0-d arrays come back as Python scalars (or str).

    Sizes are checked from the archive's directory and each array's header before anything is decompressed
    or allocated; every failure is one ValueError line naming the file (and the array).
    """
    p = _check_path(path, (".npz",))
    try:
        return _read_npz(p)
    except ValueError as exc:
        raise ValueError(f"{p.name}: {_first_line(exc)}") from None
    except (
        OSError,
        EOFError,
        zipfile.BadZipFile,
        zlib.error,
        struct.error,
        KeyError,
        NotImplementedError,
        RuntimeError,
        OverflowError,
    ) as exc:
        raise ValueError(f"{p.name}: cannot read the archive: {type(exc).__name__}: {_first_line(exc)}") from None


def _read_npz(p: Path) -> dict[str, Any]:
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        hint = " (it is a .npy array)" if magic[:4] == b"\x93NUM" else ""
        raise ValueError(f"not an .npz archive{hint}")
    out: dict[str, Any] = {}
    with zipfile.ZipFile(p) as zf:
        infos = zf.infolist()
        total = sum(i.file_size for i in infos)
        if total > MAX_FILE_BYTES or len(infos) > MAX_ARRAYS:
            raise ValueError(
                f"{len(infos)} arrays of {total} bytes uncompressed; the limit is {MAX_ARRAYS} arrays "
                f"and {MAX_FILE_BYTES} bytes"
            )
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or "/" in name or len(name) > 204:
                raise ValueError(f"unexpected archive member {name[:80]!r} (an .npz holds only NAME.npy arrays)")
            key = name[:-4]
            if key in out:
                raise ValueError(f"array `{key}` appears twice")
            with zf.open(info) as fh:
                shape, dtype = _member_header(fh, key)
                if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
                    raise ValueError(
                        f"`{key}` has dtype {dtype} (Python objects or records): not read, files "
                        f"are read without pickle"
                    )
                need = math.prod(shape) * dtype.itemsize
                if need > info.file_size:
                    raise ValueError(
                        f"`{key}` is truncated: its header promises shape {shape} of {dtype} "
                        f"({need} bytes) but the archive holds {info.file_size} bytes"
                    )
            with zf.open(info) as fh:
                arr = np.lib.format.read_array(fh, allow_pickle=False, max_header_size=MAX_HEADER_BYTES)
            if arr.ndim == 0:
                v = arr.item()
                out[key] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            else:
                out[key] = arr
    return out


def _npz_to_dict(path: Path) -> dict[str, Any]:
    arrays = read_npz(path)
    out: dict[str, Any] = {}
    meta = arrays.pop("meta_json", None)
    if meta is not None:
        if not isinstance(meta, str):
            raise ValueError(f"{path.name}: `meta_json` must be one JSON string, got {type(meta).__name__}")
        meta = _json_text(meta, f"{path.name}: `meta_json`")
        if not isinstance(meta, dict):
            raise ValueError(f"{path.name}: `meta_json` must be a JSON object, got {type(meta).__name__}")
        out.update(meta)
    cost = arrays.pop("cost_json", None)  # files written before meta_json
    if cost is not None:
        if not isinstance(cost, str):
            raise ValueError(f"{path.name}: `cost_json` must be one JSON string")
        arrays["cost"] = _json_text(cost, f"{path.name}: `cost_json`")
    both = sorted(set(out) & set(arrays))
    if both:
        raise ValueError(f"{path.name}: key(s) {', '.join(both)} given both as an array and in `meta_json`")
    out.update(arrays)
    return out


def load_problem(path: str | os.PathLike) -> Any:
    """Read a ``.npz`` or ``.json`` problem file of any family (never with pickle).

    Every failure is one ValueError line that starts with the file's name and names the bad field.
    """
    p = _check_path(path)
    d = _npz_to_dict(p) if p.suffix == ".npz" else read_json(p)
    return problem_from_dict(d, source=p.name)


def problem_text(problem: Any, suffix: str) -> bytes:
    """The bytes of ``problem``'s file in the format named by ``suffix`` (".npz" or ".json")."""
    if suffix not in (".npz", ".json"):
        raise ValueError(f"`path` must end in .npz or .json, got suffix {suffix!r}")
    d = problem_to_dict(problem)
    if suffix == ".json":
        return json.dumps(d, allow_nan=False).encode("utf-8")
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for key, v in d.items():
        if isinstance(v, (list, np.ndarray)):
            arrays[key] = np.asarray(v)
        else:
            meta[key] = v
    arrays["meta_json"] = np.array(json.dumps(meta, allow_nan=False))
    buf = _io.BytesIO()
    # numpy types **kwds as the allow_pickle flag too; the keys here are field names and "meta_json"
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


# ---- writers ------------------------------------------------------------------------------------------------
def _umask() -> int:
    # Linux says it without changing it (setting it to read it races with threads creating files meanwhile)
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: read by setting it, set back at once
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` whole or not at all, with the mode the umask gives a new file.

    The bytes go to a temporary file in the same folder, which gets mode ``0o666 & ~umask`` (an existing file's
    mode is kept) and is renamed over ``path``; an interrupt leaves nothing behind.
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    folder = p.parent if str(p.parent) else Path(".")
    try:
        mode = p.stat().st_mode & 0o7777 if p.is_file() else 0o666 & ~_umask()
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.chmod(tmp, mode)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return p


def save_problem(problem: Any, path: str | os.PathLike) -> Path:
    """Write ``problem`` (any family) to ``.npz`` or ``.json`` following the schema above, atomically."""
    p = Path(path)
    if p.suffix not in (".npz", ".json"):
        raise ValueError(f"`path` must end in .npz or .json, got {p.name!r}")
    return write_atomic(p, problem_text(problem, p.suffix))


# ---- solutions ----------------------------------------------------------------------------------------------
def _solution_kinds() -> dict[str, type]:
    return {name: fam.solution for name, fam in all_families().items()}


def save_solution_text(solution: Any) -> str:
    """A :class:`Solution` as JSON text: its ``to_dict()`` with the family's ``kind`` first."""
    kind = next((k for k, t in _solution_kinds().items() if type(solution) is t), None)
    d = solution.to_dict()
    return json.dumps({"kind": kind, **d} if kind else d, indent=1, allow_nan=False)


def save_solution(solution: Any, path: str | os.PathLike) -> Path:
    """Write a :class:`Solution` as JSON, atomically."""
    return write_atomic(path, save_solution_text(solution))


def _opt_float(d: dict, key: str, *, nan: bool = False) -> float | None:
    v = d.get(key)
    if v is None:
        return float("nan") if nan else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ValueError(f"`{key}` must be a finite number or null, got {v!r:.80}")
    return float(v)


def _opt_array(d: dict, key: str, integer: bool) -> np.ndarray | None:
    from ._validate import as_float_array, as_int_array

    v = d.get(key)
    if v is None:
        return None
    try:
        ndim = np.ndim(v) if isinstance(v, list) else -1
    except (ValueError, TypeError):
        raise ValueError(f"`{key}` must be a rectangular array (its rows differ in length)") from None
    if ndim < 1:
        raise ValueError(f"`{key}` must be an array or null, got {type(v).__name__}")
    if integer:
        shape = np.shape(v)
        return as_int_array(v, key, shape, minimum=-1)
    return as_float_array(v, key, ndim)


def load_solution(path: str | os.PathLike) -> Any:
    """Read a solution file written by :func:`save_solution` back into its family's :class:`Solution` type.

    Every field is checked (types, finite numbers, integer arrays, a known status); ValueError naming the file
    and the field otherwise. A file without ``kind`` (written before it was stored) is read as a plain
    :class:`Solution`, its family fields left out.
    """
    import dataclasses

    from .solution import Solution, Status

    p = _check_path(path, (".json",))
    d = read_json(p)
    try:
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        kinds = _solution_kinds()
        kind = d.get("kind")
        if kind is not None and (not isinstance(kind, str) or kind not in kinds):
            raise ValueError(f"`kind` must be one of {', '.join(map(repr, kinds))}, got {kind!r:.80}")
        cls: Any = kinds[kind] if kind is not None else Solution
        fam = all_families()[kind] if kind is not None else None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"kind"})
        if unknown and kind is not None:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")
        if not isinstance(d.get("method"), str):
            raise ValueError(f"`method` must be a string, got {d.get('method')!r:.80}")
        try:
            status = Status(d.get("status"))
        except ValueError:
            raise ValueError(
                f"`status` must be one of {', '.join(s.value for s in Status)}, got {d.get('status')!r:.80}"
            ) from None
        for key, typ in (("message", str), ("feasible", bool), ("stats", dict)):
            if key in d and not isinstance(d[key], typ):
                raise ValueError(f"`{key}` must be a {typ.__name__}, got {type(d[key]).__name__}")
        wall = _opt_float(d, "wall_time") or 0.0
        if wall < 0:
            raise ValueError(f"`wall_time` must be >= 0, got {wall!r}")
        fields: dict[str, Any] = dict(
            method=d["method"],
            status=status,
            objective=_opt_float(d, "objective", nan=True),
            bound=_opt_float(d, "bound"),
            gap=_opt_float(d, "gap"),
            wall_time=wall,
            stats=d.get("stats", {}),
            message=d.get("message", ""),
            feasible=d.get("feasible", False),
            assignment=_opt_array(d, "assignment", integer=True),
        )
        for name in cls.family_fields():
            how = fam.field_kind(name) if fam is not None else ARRAY_OF_INTS
            if how == AS_READ:  # nested lists (of ints), kept as read
                v = d.get(name)
                if v is not None and not isinstance(v, (list, dict)):
                    raise ValueError(f"`{name}` must be a list, an object or null")
                fields[name] = v
            else:
                fields[name] = _opt_array(d, name, integer=how == ARRAY_OF_INTS)
        return cls(**fields)
    except ValueError as exc:
        raise ValueError(f"{p.name}: {_first_line(exc)}") from None
