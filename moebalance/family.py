"""What a problem family declares, and how the core finds the declarations.

A family (routing, placement, replication, or one of your own) is a package ``moebalance/<name>/`` with the same
modules: ``problem`` (the validated, immutable problem class), ``solution`` (its typed :class:`Solution`),
``check`` (the shared feasibility check behind ``problem.evaluate``), ``io`` (its file schema) and ``family``
(one :class:`Family` declaration tying them together). The registry, io, the CLI and ``compare`` read only
these declarations; none of them names a family.

Discovery needs no central list: :func:`all_families` imports ``moebalance.<pkg>.family`` for every
sub-package of ``moebalance`` that has such a module (found on disk, without importing anything else), and a
family defined elsewhere (a plugin, a test) calls :func:`declare` itself. Declarations import numpy only.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import os
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "Family",
    "Generator",
    "declare",
    "all_families",
    "family_named",
    "family_of",
    "family_names",
    "ARRAY_OF_INTS",
    "ARRAY_OF_FLOATS",
    "AS_READ",
]

# how io reads a family's solution field back from JSON (``Family.solution_fields``)
ARRAY_OF_INTS = "ints"  # an integer array (>= -1), e.g. phy2log
ARRAY_OF_FLOATS = "floats"  # a finite float array, e.g. a routing bias
AS_READ = "as_read"  # nested lists or an object, kept as read (token ranges)
_FIELD_KINDS = (ARRAY_OF_INTS, ARRAY_OF_FLOATS, AS_READ)


@dataclasses.dataclass(frozen=True)
class Generator:
    """A synthetic problem generator the ``moebalance gen`` command offers for a family.

    arguments: ``(flags, argparse keyword arguments)`` per option; a flag two families share must have the same
               default (its help texts are joined).
    make:      ``make(args) -> (problem, note)``: the problem from the parsed arguments and a line to print.
    """

    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...]
    make: Callable[[argparse.Namespace], tuple[Any, str]]


def _problem_to_dict(problem: Any) -> dict[str, Any]:
    return dict(problem.to_dict())


@dataclasses.dataclass(frozen=True)
class Family:
    """One problem family, as the registry, io, the CLI and ``compare`` see it.

    name:            the family's name; equals ``problem.kind`` and the ``kind`` key of its files.
    problem:         the problem class (``evaluate``, ``certify``, ``sense``, ``objective_scale``,
                     ``solution_type``, ``to_dict``).
    solution:        its :class:`~moebalance.solution.Solution` subclass (``problem.solution_type``).
    auto:            preference order of ``method="auto"``: the first installed method that applies wins.
    to_dict:         problem -> its file schema (default ``problem.to_dict()``); io adds ``kind``.
    from_dict:       schema dict -> problem (default ``problem.from_dict``); ValueError naming the key.
    solution_fields: how io reads each family field of ``solution`` back (:data:`ARRAY_OF_INTS`, the default,
                     :data:`ARRAY_OF_FLOATS` or :data:`AS_READ`).
    untagged_files:  files without a ``kind`` key are read as this family (at most one family says so).
    summary:         ``summary(problem, solution) -> lines`` the CLI's ``solve`` prints below the common ones.
    generator:       what ``moebalance gen --family NAME`` offers, or None.
    description:     one line for listings.
    """

    name: str
    problem: type
    solution: type
    auto: tuple[str, ...] = ()
    to_dict: Callable[[Any], dict[str, Any]] = _problem_to_dict
    from_dict: Callable[[dict[str, Any]], Any] | None = None
    solution_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    untagged_files: bool = False
    summary: Callable[[Any, Any], list[str]] | None = None
    generator: Generator | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"`name` must be an identifier, got {self.name!r}")
        if getattr(self.problem, "kind", None) != self.name:
            raise ValueError(f"`problem` {self.problem.__name__}.kind must be {self.name!r}")
        if getattr(self.problem, "solution_type", None) is not self.solution:
            raise ValueError(f"`solution` must be {self.problem.__name__}.solution_type")
        bad = {k: v for k, v in self.solution_fields.items() if v not in _FIELD_KINDS}
        if bad:
            raise ValueError(f"`solution_fields` kinds must be one of {_FIELD_KINDS}, got {bad}")
        object.__setattr__(self, "auto", tuple(self.auto))
        object.__setattr__(self, "solution_fields", dict(self.solution_fields))

    def read_problem(self, d: dict[str, Any]) -> Any:
        """The problem of schema dict ``d``."""
        if self.from_dict is not None:
            return self.from_dict(d)
        problem: Any = self.problem
        return problem.from_dict(d)

    def field_kind(self, name: str) -> str:
        """How io reads solution field ``name`` (:data:`ARRAY_OF_INTS` unless declared)."""
        return self.solution_fields.get(name, ARRAY_OF_INTS)


_DECLARED: dict[str, Family] = {}
_DISCOVERED = False


def declare(family: Family) -> Family:
    """Make ``family`` known to the registry, io, the CLI and ``compare``; returns it.

    Declaring the same family again (a module reloaded) replaces it; another family under a taken name, or a
    second family reading untagged files, is a ValueError.
    """
    if not isinstance(family, Family):
        raise ValueError(f"`family` must be a Family, got {type(family).__name__}")
    old = _DECLARED.get(family.name)
    if old is not None and old.problem.__qualname__ != family.problem.__qualname__:
        raise ValueError(f"a family named {family.name!r} is already declared ({old.problem.__qualname__})")
    if family.untagged_files and any(f.untagged_files and f.name != family.name for f in _DECLARED.values()):
        raise ValueError("another family already reads files without a `kind` key")
    _DECLARED[family.name] = family
    return family


def _family_modules() -> Iterator[str]:
    """``moebalance.<pkg>.family`` of every sub-package that has one (found on disk, nothing else imported)."""
    import moebalance

    for info in pkgutil.iter_modules(moebalance.__path__):
        if not info.ispkg:
            continue
        root = getattr(info.module_finder, "path", None)
        if root is None:  # not a folder on disk (a zip): ask the import system, which imports the package
            if importlib.util.find_spec(f"moebalance.{info.name}.family") is not None:
                yield f"moebalance.{info.name}.family"
        elif importlib.machinery.PathFinder.find_spec("family", [os.path.join(root, info.name)]) is not None:
            yield f"moebalance.{info.name}.family"


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        for module in _family_modules():
            importlib.import_module(module)
        _DISCOVERED = True


def all_families() -> dict[str, Family]:
    """``{name: Family}`` of every declared family, by name (the package's own ones found first)."""
    _discover()
    return dict(sorted(_DECLARED.items()))


def family_names() -> list[str]:
    """The declared families' names, sorted."""
    return sorted(all_families())


def family_named(name: str) -> Family | None:
    """The family called ``name``, or None."""
    if not isinstance(name, str):
        return None
    if name not in _DECLARED:
        _discover()
    return _DECLARED.get(name)


def family_of(obj: Any) -> Family | None:
    """The family of a problem object or class, of a solution object or class, or None."""
    cls = obj if isinstance(obj, type) else type(obj)
    families = all_families().values()
    for c in cls.__mro__:
        for fam in families:
            if c is fam.problem or c is fam.solution:
                return fam
    return None
