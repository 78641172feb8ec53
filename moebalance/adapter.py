"""The adapter type: what a method is, what it accepts, and its one ``solve`` (after cvxpy's ``Solver``).

Every registered method of every family is an :class:`Adapter`. It declares, in one place:

- who it is: ``family`` (the problem class or family name), ``name``, ``aliases``, ``description``;
- its capability flags (:data:`FLAGS`): ``exact``, ``gives_bound``, ``deterministic``, ``supports_time_limit``,
  ``interruptible``, ``isolated``, ``per_step``;
- what it needs: ``REQUIRED_MODULES`` (back-end modules, checked without importing them) and ``requires``
  (problem attributes that must not be None, e.g. ``old_phy2log``);
- ``STATUS_MAP``: the back-end's status table (a ``solvers._status.StatusTable``) or None for pure numpy;
- ``OPTIONS``: its option schema, ``{name: Option(type, doc)}``. The defaults are those of ``solve``'s keyword
  arguments (the signature is the one place they are written); :func:`bind_options` reads them at
  registration and refuses a schema that disagrees with the signature;
- one ``solve(problem, *, time_limit=None, **options) -> Solution``. Adapters with a back-end walk
  apply -> back-end -> invert (``build`` / ``run`` / ``to_solution`` in ``solvers/*.py``); time limits,
  the child process and Ctrl-C are the driver's (``solvers/_isolate.py``).

A method written as a plain function (``@register(family, name, ...)``) is wrapped as a
:class:`FunctionAdapter`; a new one may subclass :class:`Adapter` and register with
:func:`moebalance.registry.register_adapter`. ``moebalance.registry.SolverInfo`` is this type under its old name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

__all__ = ["Adapter", "FunctionAdapter", "Option", "FLAGS", "bind_options", "adapter_file"]

# the capability flags, in the order the method table shows them
FLAGS: tuple[str, ...] = (
    "exact",
    "gives_bound",
    "deterministic",
    "supports_time_limit",
    "interruptible",
    "isolated",
    "per_step",
)
FLAG_DOCS: dict[str, str] = {
    "exact": "proves optimality when it finishes (status `optimal`)",
    "gives_bound": "returns a proven bound on the optimum",
    "deterministic": "the same problem gives the same answer every run",
    "supports_time_limit": "honours `time_limit`, model building included",
    "interruptible": "Ctrl-C stops its back-end at once (it catches SIGINT itself otherwise)",
    "isolated": "under a time limit a large model runs in a child process the deadline kills",
    "per_step": "safe and cheap enough to plan every training step: deterministic, no solver back-end, "
    "linear-ish time (the expert-parallel runtime chooses plans by it)",
}

_NO_DEFAULT = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method: ``type`` as the docs write it (``"int"``, ``"float | None"``), a one-line ``doc``
    and the ``default`` (read from ``solve``'s signature at registration; give it here only for a ``solve`` that
    takes ``**options``)."""

    type: str = "any"
    doc: str = ""
    default: Any = _NO_DEFAULT


def _signature_defaults(func: Callable[..., Any]) -> tuple[dict[str, Any], bool]:
    """``({keyword: default}, takes **kwargs)`` of ``func``'s keyword arguments (``time_limit`` left out)."""
    sig = inspect.signature(func)
    out: dict[str, Any] = {}
    var_kw = False
    for p in sig.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            var_kw = True
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "time_limit":
            out[p.name] = p.default
    return out, var_kw


def bind_options(func: Callable[..., Any], declared: Mapping[str, Any] | None, where: str) -> dict[str, Option]:
    """The option schema of ``func`` with every default filled in from its signature.

    ``declared`` maps each option to an :class:`Option` or (the older form) to its default. A default written
    both in the signature and in ``declared`` must be the same value; an option must have a default somewhere.
    TypeError naming ``where`` otherwise: a registration error is the author's, caught at import.
    """
    sig, var_kw = _signature_defaults(func)
    out: dict[str, Option] = {}
    for name, spec in (declared or {}).items():
        opt = spec if isinstance(spec, Option) else Option(default=spec)
        in_sig = sig.get(name, _NO_DEFAULT)
        if name not in sig and not var_kw:
            raise TypeError(f"{where}: option {name!r} is not a keyword argument of {func.__qualname__}")
        if opt.default is _NO_DEFAULT:
            if in_sig is _NO_DEFAULT:
                raise TypeError(f"{where}: option {name!r} has no default (give it in the signature)")
            opt = dataclasses.replace(opt, default=in_sig)
        elif in_sig is not _NO_DEFAULT and not _same(in_sig, opt.default):
            raise TypeError(
                f"{where}: option {name!r} has default {opt.default!r} in the registration but {in_sig!r} in the "
                "signature; write it once, in the signature"
            )
        out[name] = opt
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(type(a) is type(b) and a == b)
    except (TypeError, ValueError):  # arrays and the like: the same object only
        return a is b


def _check_flags(a: Adapter) -> None:
    """Flags that contradict each other are the author's error, refused at registration."""
    if a.per_step and (not a.deterministic or a.REQUIRED_MODULES):
        raise TypeError(f"method {a.name!r}: `per_step` needs `deterministic` and no back-end module")
    if a.isolated and not a.supports_time_limit:
        raise TypeError(f"method {a.name!r}: `isolated` (a child process killed at the deadline) needs a time limit")


def adapter_file(obj: Any) -> str:
    """The file that defines ``obj`` (a function or class), as a path in the source tree:
    ``moebalance.solvers.routing_flow`` -> ``solvers/routing_flow.py``; ``moebalance.x`` -> ``moebalance/x.py``;
    any other module ``a.b`` -> ``a/b.py``."""
    module = getattr(obj, "__module__", "") or ""
    parts = module.split(".")
    if parts[0] == "moebalance" and len(parts) > 1 and parts[1] in ("solvers", "kernels", "integrations"):
        parts = parts[1:]
    return "/".join(parts) + ".py"


class Adapter:
    """One method of one family: its flags, needs, option schema and ``solve`` (module docstring).

    Subclasses set the class attributes and implement :meth:`solve`; the registry keeps one instance. The
    attributes below are the defaults a subclass overrides.
    """

    family: ClassVar[Any] = None
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    # capability flags (FLAG_DOCS says what each promises)
    exact: ClassVar[bool] = False
    gives_bound: ClassVar[bool] = False
    deterministic: ClassVar[bool] = True
    supports_time_limit: ClassVar[bool] = False
    interruptible: ClassVar[bool] = False
    isolated: ClassVar[bool] = False
    per_step: ClassVar[bool] = False
    # what it needs
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    STATUS_MAP: ClassVar[Any] = None  # a solvers._status.StatusTable, or None
    OPTIONS: ClassVar[Mapping[str, Any]] = {}

    def __init__(self) -> None:
        self._schema = bind_options(self.solve, self.OPTIONS, f"adapter {type(self).__qualname__}")
        if not isinstance(self.family, (type, str)) or not self.name:
            raise TypeError(f"adapter {type(self).__qualname__} must set `family` and `name`")
        self._family_cls: type | None = self.family if isinstance(self.family, type) else None
        _check_flags(self)

    def solve(self, problem: Any, *, time_limit: float | None = None, **options: Any) -> Any:
        """The method's raw answer (a Solution of the family's type); ``solve`` in the registry checks it."""
        raise NotImplementedError

    # ---- what the registry and the tables read ----------------------------------------------------------
    @property
    def option_schema(self) -> dict[str, Option]:
        """``{name: Option}`` with every default filled in."""
        return dict(self._schema)

    @property
    def options(self) -> dict[str, Any]:
        """``{name: default}`` of the accepted options."""
        return {k: o.default for k, o in self._schema.items()}

    @property
    def backends(self) -> tuple[str, ...]:
        """``REQUIRED_MODULES`` (the name the registry used before adapters)."""
        return tuple(self.REQUIRED_MODULES)

    @property
    def func(self) -> Callable[..., Any]:
        """The callable ``solve`` (``func(problem, time_limit=..., **options)``)."""
        return self.solve

    @property
    def source_file(self) -> str:
        """The file the method is written in (``solvers/routing_flow.py`` for ``mcf``)."""
        return adapter_file(type(self))

    @property
    def kind(self) -> str:
        """The family's name (``routing``, ``placement``, ``replication``)."""
        fam = self._family_cls if self._family_cls is not None else self.family
        return str(fam if isinstance(fam, str) else getattr(fam, "kind", fam.__name__))

    def flags(self) -> dict[str, bool]:
        """``{flag: value}`` of every capability flag, in :data:`FLAGS` order."""
        return {f: bool(getattr(self, f)) for f in FLAGS}

    def is_installed(self) -> bool:
        """True when every back-end module this method needs can be imported (checked without importing)."""
        return all(importlib.util.find_spec(b) is not None for b in self.REQUIRED_MODULES)

    def why_not(self, problem: Any) -> str | None:
        """None when this method can solve ``problem``, else the reason (what the problem lacks)."""
        missing = [r for r in self.requires if getattr(problem, r, None) is None]
        if missing:
            return f"it needs the problem's {', '.join(f'`{r}`' for r in missing)}, which this problem lacks"
        return None

    def applies_to(self, problem: Any) -> bool:
        """True when this method can solve ``problem`` (an object; a class or family name: always True)."""
        if isinstance(problem, (str, type)):
            return True
        return self.why_not(problem) is None

    def __repr__(self) -> str:
        flags = ", ".join(f for f, v in self.flags().items() if v)
        return f"<{type(self).__name__} {self.kind}/{self.name} ({flags or 'no flags'})>"


class FunctionAdapter(Adapter):
    """A method written as a function ``func(problem, *, time_limit, **options) -> Solution``, as
    ``@register(family, name, ...)`` declares it: the flags are this instance's, ``solve`` calls ``func``."""

    def __init__(
        self,
        family: Any,
        name: str,
        func: Callable[..., Any],
        *,
        options: Mapping[str, Any] | None = None,
        aliases: tuple[str, ...] = (),
        description: str = "",
        requires: tuple[str, ...] = (),
        backends: tuple[str, ...] = (),
        status_map: Any = None,
        **flags: bool,
    ) -> None:
        unknown = sorted(set(flags) - set(FLAGS))
        if unknown:
            raise TypeError(f"method {name!r}: unknown capability flag(s) {', '.join(unknown)}; flags: {FLAGS}")
        self._func = func
        # instance attributes shadow the class defaults (Adapter's ClassVars are defaults, not constants)
        vars(self).update(
            family=family,
            name=name,
            aliases=tuple(aliases),
            description=description or ((func.__doc__ or "").strip().splitlines() or [""])[0],
            requires=tuple(requires),
            REQUIRED_MODULES=tuple(backends),
            STATUS_MAP=status_map,
            OPTIONS=dict(options or {}),
            **{f: bool(v) for f, v in flags.items()},
        )
        self._schema = bind_options(func, self.OPTIONS, f"method {name!r}")
        self._family_cls = family if isinstance(family, type) else None
        _check_flags(self)

    def solve(self, problem: Any, *, time_limit: float | None = None, **options: Any) -> Any:
        return self._func(problem, time_limit=time_limit, **options)

    @property
    def func(self) -> Callable[..., Any]:
        return self._func

    @property
    def source_file(self) -> str:
        return adapter_file(self._func)
