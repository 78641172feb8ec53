"""The method registry and ``solve``: one entry point per problem family (after scipy's ``linprog(method=...)``).

Methods register against a problem class (``@register(RoutingProblem, "mcf", exact=True, ...)``); ``solve``
looks the problem's class up, runs the method, and hands its raw answer to :func:`finalize`, which runs the
shared check (``problem.evaluate``) and fills objective, feasibility, gap and status. Nothing here knows a
family: the problem classes supply ``evaluate``, ``certify``, ``sense``, ``objective_scale`` and
``solution_type``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .adapter import FLAGS, Adapter, FunctionAdapter
from .family import all_families, family_named, family_names
from .solution import Solution, Status, relative_gap

__all__ = [
    "Adapter",
    "SolverInfo",
    "register",
    "register_adapter",
    "method_table",
    "method_table_markdown",
    "solve",
    "finalize",
    "available_methods",
    "method_info",
    "DEFAULTS",
    "families",
    "OPTIMALITY_TOL",
]

# relative tolerance under which a claimed optimum must agree with its own bound
OPTIMALITY_TOL = 1e-6


class _FamilyTable(Mapping):
    """A read-only ``{family name: value}`` view of the declared families (:mod:`moebalance.family`)."""

    def __init__(self, value: Callable[[Any], Any]):
        self._value = value

    def __getitem__(self, name: str) -> Any:
        fam = family_named(name)
        if fam is None:
            raise KeyError(name)
        return self._value(fam)

    def __iter__(self) -> Iterator[str]:
        return iter(all_families())

    def __len__(self) -> int:
        return len(all_families())

    def __repr__(self) -> str:
        return repr(dict(self))


# family names accepted where a user names a family by string (CLI, available_methods("routing")): every
# declared family, as ``{name: (module, problem class name)}``
_FAMILY_PATHS: Mapping[str, tuple[str, str]] = _FamilyTable(lambda f: (f.problem.__module__, f.problem.__name__))


SolverInfo = Adapter
"""The old name of :class:`moebalance.adapter.Adapter` (what ``method_info`` returns); kept for callers."""

_REGISTRY: dict[type[Any], dict[str, Adapter]] = {}  # problem class -> {method: adapter}
_ALIASES: dict[type, dict[str, str]] = {}
# preference order for method="auto", per family name: the first installed one wins (each family declares its own)
DEFAULTS: Mapping[str, tuple[str, ...]] = _FamilyTable(lambda f: f.auto)


def _family_class(name: str) -> type:
    fam = family_named(name)
    if fam is None:
        raise KeyError(name)
    return fam.problem


def _as_family(family: Any, argname: str = "family") -> type:
    if isinstance(family, type):
        return family
    if isinstance(family, str) and family_named(family) is not None:
        return _family_class(family)
    raise ValueError(f"`{argname}` must be a problem class or one of {', '.join(family_names())}, got {family!r}")


def register(
    family: Any,
    name: str,
    *,
    exact: bool = False,
    gives_bound: bool = False,
    deterministic: bool = True,
    supports_time_limit: bool = False,
    interruptible: bool = False,
    isolated: bool = False,
    per_step: bool = False,
    backends: tuple[str, ...] = (),
    options: dict[str, Any] | None = None,
    aliases: tuple[str, ...] = (),
    description: str = "",
    requires: tuple[str, ...] = (),
    status_map: Any = None,
) -> Callable:
    """Decorator: add ``func(problem, *, time_limit, **options) -> Solution`` to ``family``'s registry, wrapped
    as a :class:`~moebalance.adapter.FunctionAdapter` with these capability flags.

    ``family`` is the problem class (a family name string is accepted). ``options`` maps each accepted option
    to an :class:`~moebalance.adapter.Option` (type and one-line doc; the default is read from ``func``'s
    signature) or, the older form, to its default; ``solve`` rejects any other option by name. ``requires``
    names problem attributes that must not be None for the method to apply (``available_methods`` and
    ``compare`` skip the method on a problem without them; ``solve`` refuses it with a ValueError saying why).
    A method written as a class registers with :func:`register_adapter`.
    """
    if isinstance(requires, str):
        requires = (requires,)
    cls = _as_family(family)

    def deco(func: Callable[..., Solution]) -> Callable[..., Solution]:
        adapter = FunctionAdapter(
            cls,
            name,
            func,
            options=options,
            aliases=tuple(aliases),
            description=description,
            requires=tuple(requires),
            backends=tuple(backends),
            status_map=status_map,
            exact=exact,
            gives_bound=gives_bound,
            deterministic=deterministic,
            supports_time_limit=supports_time_limit,
            interruptible=interruptible,
            isolated=isolated,
            per_step=per_step,
        )
        _add(cls, adapter)
        return func

    return deco


def register_adapter(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: register one instance of an :class:`~moebalance.adapter.Adapter` subclass under its
    ``family`` and ``name`` (and ``aliases``); returns the class unchanged."""
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, Adapter)):
        raise TypeError(f"register_adapter takes an Adapter subclass, got {adapter_cls!r}")
    cls = _as_family(adapter_cls.family)
    adapter = adapter_cls()
    adapter._family_cls = cls
    vars(adapter)["family"] = cls  # the problem class, as for a function registered with a family name
    _add(cls, adapter)
    return adapter_cls


def _add(cls: type, adapter: Adapter) -> None:
    _REGISTRY.setdefault(cls, {})[adapter.name] = adapter
    for alias in adapter.aliases:
        _ALIASES.setdefault(cls, {})[alias] = adapter.name


_SOLVERS_LOADED = False


def _load_solvers() -> None:
    global _SOLVERS_LOADED
    if not _SOLVERS_LOADED:
        importlib.import_module("moebalance.solvers")
        _SOLVERS_LOADED = True


def families() -> dict[str, type]:
    """``{name: problem class}`` of every family with registered methods."""
    _load_solvers()
    return {str(getattr(c, "kind", c.__name__)): c for c in _REGISTRY}


def _table_of(problem: Any, *, allow_class: bool = True) -> tuple[type, dict[str, Adapter]]:
    _load_solvers()
    if isinstance(problem, str) and allow_class and family_named(problem) is not None:
        cls = _family_class(problem)
    elif isinstance(problem, type) and allow_class:
        cls = problem
    else:
        cls = type(problem)
    for c in cls.__mro__:
        if c in _REGISTRY:
            return c, _REGISTRY[c]
    names = ", ".join(sorted(c.__name__ for c in _REGISTRY))
    raise ValueError(f"`problem` must be a problem object ({names}), got {problem!r:.80}")


def available_methods(problem: Any, *, installed_only: bool = True) -> list[str]:
    """Names of the methods for this problem (object, class or family name): exact ones first, then those
    giving a bound, then the rest, defaults first within each; only installed ones unless told otherwise.

    For a problem object, only the methods that can solve it (``migrate`` only with an ``old_phy2log``)."""
    cls, table = _table_of(problem)
    order = DEFAULTS.get(getattr(cls, "kind", ""), ())

    def rank(i: Adapter) -> tuple:
        return (not i.exact, not i.gives_bound, order.index(i.name) if i.name in order else len(order))

    return [
        i.name
        for i in sorted(table.values(), key=rank)
        if (i.is_installed() or not installed_only) and i.applies_to(problem)
    ]


def method_info(problem: Any, method: str) -> Adapter:
    """The :class:`~moebalance.adapter.Adapter` of ``method`` (aliases and "auto" allowed); ValueError naming the valid methods."""
    cls, table = _table_of(problem)
    if not isinstance(method, str):
        raise ValueError(f"`method` must be a method name, got {method!r:.80}")
    if method == "auto":
        for name in DEFAULTS.get(getattr(cls, "kind", ""), ()):
            if name in table and table[name].is_installed() and table[name].applies_to(problem):
                return table[name]
        for info in table.values():
            if info.is_installed() and info.applies_to(problem):
                return info
        raise ValueError(f"no installed method for {cls.__name__}; install ortools or scipy")
    name = _ALIASES.get(cls, {}).get(method, method)
    if name not in table:
        valid = sorted(list(table) + list(_ALIASES.get(cls, {})))
        raise ValueError(f"unknown `method` {method!r} for {cls.__name__}; valid methods: {', '.join(valid)}")
    info = table[name]
    if not info.is_installed():
        raise ValueError(f"`method` {name!r} needs {', '.join(info.backends)}, which is not installed")
    why = None if isinstance(problem, (str, type)) else info.why_not(problem)
    if why is not None:
        others = [n for n in available_methods(problem)]
        raise ValueError(
            f"`method` {name!r} cannot solve this problem: {why}; methods that can: {', '.join(others) or 'none'}"
        )
    return info


def method_table() -> list[dict[str, Any]]:
    """One row per registered method of every family, read from the adapters (installed or not): ``family``,
    ``method``, ``aliases``, ``file`` (where it is written: ``mcf`` -> ``solvers/routing_flow.py``), ``flags``
    (``{flag: bool}`` in :data:`moebalance.adapter.FLAGS` order), ``backends``, ``requires``, ``options``
    (``{name: {"type", "default", "doc"}}``) and ``description``. Families in their usual order, methods as
    ``available_methods`` lists them."""
    fams = families()
    order = [f for f in _FAMILY_PATHS if f in fams] + sorted(f for f in fams if f not in _FAMILY_PATHS)
    rows = []
    for fam in order:
        cls = fams[fam]
        table = _REGISTRY[cls]
        for name in available_methods(cls, installed_only=False):
            a = table[name]
            rows.append(
                {
                    "family": fam,
                    "method": name,
                    "aliases": sorted(k for k, v in _ALIASES.get(cls, {}).items() if v == name),
                    "file": a.source_file,
                    "flags": a.flags(),
                    "backends": list(a.backends),
                    "requires": list(a.requires),
                    "options": {
                        k: {"type": o.type, "default": o.default, "doc": o.doc} for k, o in a.option_schema.items()
                    },
                    "description": a.description,
                }
            )
    return rows


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def method_table_markdown() -> str:
    """:func:`method_table` as Markdown (the table in ``docs/methods.md``; ``moebalance methods --markdown``)."""
    rows = method_table()
    lines = [
        "| family | method | file | " + " | ".join(f"`{f}`" for f in FLAGS) + " | back-ends | options (defaults) |",
        "|---|---|---|" + "---|" * len(FLAGS) + "---|---|",
    ]
    for r in rows:
        name = f"`{r['method']}`" + "".join(f" (`{a}`)" for a in r["aliases"])
        opts = ", ".join(f"`{k}={o['default']!r}`" for k, o in r["options"].items()) or "-"
        flags = " | ".join("yes" if v else "-" for v in r["flags"].values())
        backends = ", ".join(r["backends"]) or "numpy"
        if r["requires"]:
            backends += "; needs " + ", ".join(f"`{q}`" for q in r["requires"])
        lines.append(f"| {r['family']} | {name} | `{r['file']}` | {flags} | {backends} | {_md(opts)} |")
    lines += ["", "| family | method | option | type | default | what it does |", "|---|---|---|---|---|---|"]
    for r in rows:
        for k, o in r["options"].items():
            lines.append(
                f"| {r['family']} | `{r['method']}` | `{k}` | {_md(o['type'])} | `{_md(repr(o['default']))}` "
                f"| {_md(o['doc']) or '-'} |"
            )
    return "\n".join(lines) + "\n"


def check_time_limit(time_limit: Any) -> float | None:
    """``time_limit`` as positive finite seconds or None; ValueError naming it otherwise."""
    if time_limit is None:
        return None
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or isinstance(time_limit, complex):
        raise ValueError(f"`time_limit` must be a positive number of seconds, got {time_limit!r}")
    t = float(time_limit)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"`time_limit` must be a positive number of seconds, got {time_limit!r}")
    return t


def check_options(info: Adapter, options: dict[str, Any]) -> dict[str, Any]:
    """Options merged over the method's defaults; ValueError naming unknown ones and listing the valid ones."""
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = ", ".join(sorted(info.options)) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {info.name!r}; valid options: {valid}"
        )
    return {**info.options, **options}


def solve(problem: Any, method: str = "auto", *, time_limit: float | None = None, **options: Any) -> Solution:
    """Solve ``problem`` with ``method`` and return a checked, typed solution.

    Args:
      problem: a problem object (:class:`RoutingProblem`, :class:`PlacementProblem`, ``ReplicationProblem``).
      method: a registry name (``available_methods(problem)``) or "auto".
      time_limit: seconds, or None. Methods with ``supports_time_limit`` honour it, model building included;
        a run that hit the limit has status ``time_limit``.
      **options: method-specific options; unknown ones raise ValueError listing the valid ones.

    Every answer goes through the shared check (:func:`finalize`). KeyboardInterrupt propagates; any other
    back-end exception becomes status ``error``.
    """
    if isinstance(problem, (str, type)):
        raise ValueError(
            f"`problem` must be a problem object, not {problem!r:.80}; build one first, e.g. RoutingProblem(scores, k)"
        )
    info = method_info(problem, method)
    time_limit = check_time_limit(time_limit)
    opts = check_options(info, options)
    t0 = time.perf_counter()
    try:
        raw = info.solve(problem, time_limit=time_limit, **opts)
    except ValueError as exc:
        if _raised_by_us(exc):  # our own validation of an option: the caller's bad input
            raise
        raw = problem.solution_type(
            method=info.name, status=Status.ERROR, message=f"back-end {type(exc).__name__}: {exc}"
        )
    except Exception as exc:  # a back-end failure becomes a status, never a traceback
        raw = problem.solution_type(method=info.name, status=Status.ERROR, message=f"{type(exc).__name__}: {exc}")
    wall = time.perf_counter() - t0
    if not isinstance(raw, Solution):
        raw = problem.solution_type(
            method=info.name,
            status=Status.ERROR,
            message=f"method {info.name!r} returned {type(raw).__name__}, not a Solution",
        )
    return finalize(problem, raw, method=info.name, wall_time=wall)


# moebalance's own folders: the package and, in a checkout, the sub-package folders mapped by pyproject
_OUR_FOLDERS = tuple(
    str(pathlib.Path(__file__).resolve().parent.parent / d) + os.sep
    for d in ("moebalance", "solvers", "kernels", "integrations")
)


def _raised_by_us(exc: BaseException) -> bool:
    """True when the innermost frame that raised ``exc`` is moebalance's own code (input validation), False when
    it is a back-end's (cvxpy, OR-Tools, scipy: a failure of the back-end, reported as status ``error``)."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return True
    filename = os.path.realpath(last.tb_frame.f_code.co_filename)
    return filename.startswith(_OUR_FOLDERS)


def _append(message: str, more: str) -> str:
    return f"{message}; {more}" if message else more


def finalize(problem: Any, raw: Solution, *, method: str | None = None, wall_time: float | None = None) -> Solution:
    """Run the shared check on a solver's raw answer and return the family's typed solution.

    - objective, feasibility and the family fields come from ``problem.evaluate``, never from the solver;
    - an answer that violates a constraint is ``infeasible`` (or stays ``time_limit``/``error`` with its
      assignment dropped, so a stopped solver never reads as an infeasible problem);
    - ``problem.certify`` (optional) may tighten the bound from the answer and correct family fields (routing:
      the Lagrangian bound of the bias; a bias that does not reproduce the assignment is moved to
      ``stats["certificate_price"]``, keeping ``bias``'s contract);
    - a bound on the wrong side of a feasible objective is dropped as invalid;
    - a claimed optimum whose gap to its bound exceeds ``OPTIMALITY_TOL`` (or with no bound) is downgraded to
      ``feasible``.
    """
    cls = problem.solution_type
    stats = dict(raw.stats)
    status = raw.status
    message = raw.message
    bound = raw.bound if raw.bound is None or math.isfinite(raw.bound) else None
    assignment = raw.assignment
    objective = float("nan")
    feasible = False
    fields: dict[str, Any] = {}
    if assignment is None:
        if status in (Status.OPTIMAL, Status.FEASIBLE, Status.INFEASIBLE):
            status, message = Status.ERROR, _append(message, "no assignment returned")
    else:
        ev = problem.evaluate(assignment, solution=raw)
        objective, feasible, fields = ev.objective, ev.feasible, dict(ev.fields)
        stats["load_ratio"] = ev.load_ratio
        if not feasible:
            stats["violations"] = list(ev.violations)
            message = _append(message, "; ".join(ev.violations))
            if status in (Status.TIME_LIMIT, Status.ERROR):
                message = _append(message, "its infeasible incumbent was dropped")
                assignment, objective, fields = None, float("nan"), {}
            else:
                status = Status.INFEASIBLE
    certify = getattr(problem, "certify", None)
    extra_bound, extra_stats, overrides = certify(raw) if (feasible and certify is not None) else (None, {}, {})
    stats.update(extra_stats)
    if overrides.get("message"):
        message = _append(message, overrides.pop("message"))
    if extra_bound is not None and math.isfinite(extra_bound):
        bound = (
            extra_bound
            if bound is None
            else (min(bound, extra_bound) if problem.sense == "max" else max(bound, extra_bound))
        )
    gap = None
    if bound is not None and feasible and math.isfinite(objective):
        scale = problem.objective_scale()
        tol = OPTIMALITY_TOL * max(abs(objective), abs(bound), 1e-9 * scale)
        wrong_side = (bound < objective - tol) if problem.sense == "max" else (bound > objective + tol)
        if wrong_side:
            message = _append(
                message,
                f"the reported bound {bound:.8g} is invalid (the check's objective is {objective:.8g}); dropped",
            )
            stats["invalid_bound"] = bound
            bound = None
        else:
            gap = relative_gap(bound, objective, scale)
    if status == Status.OPTIMAL and (gap is None or gap > OPTIMALITY_TOL):
        status = Status.FEASIBLE
        why = "no valid bound" if gap is None else f"gap to bound is {gap:.3g}"
        message = _append(message, f"claimed optimal but {why}")
    if assignment is None and status == Status.TIME_LIMIT and "no answer" not in message:
        # the way out, said once: a stopped solver with nothing to show
        message = _append(
            message, "no answer within the time limit (objective NaN); a larger `time_limit` may give one"
        )
    names = cls.family_fields()
    keep = {name: getattr(raw, name) for name in names if hasattr(raw, name)}
    keep.update({k: v for k, v in fields.items() if k in names})
    keep.update({k: v for k, v in overrides.items() if k in names})
    return cls(
        method=method if method is not None else raw.method,
        status=status,
        objective=objective,
        bound=bound,
        gap=gap,
        assignment=assignment,
        wall_time=raw.wall_time if wall_time is None else wall_time,
        stats=stats,
        message=message,
        feasible=feasible,
        **keep,
    )
