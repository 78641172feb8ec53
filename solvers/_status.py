"""One status table per back-end, shared by every problem family (after cvxpy's per-solver ``STATUS_MAP``).

Each table maps every status a back-end can return (by its enum name) to one of ours. The table says what
the back-end's status means *if a limit stopped it*: a back-end that stopped before proving optimality maps to
``time_limit``. :meth:`StatusTable.translate` then applies what the adapter knows about the run:

- no time limit was given, yet the back-end stopped early (another limit): ``feasible`` with an answer,
  ``error`` without one;
- a status that promises an answer (``optimal``, ``feasible``) but came without one is an ``error``.

Usage from any adapter (routing, placement, replication)::

    from ._status import CPSAT
    status = CPSAT.translate(code, time_limit=time_limit, has_solution=x is not None)
    name = CPSAT.name(code)          # "OPTIMAL", for stats and messages

``code`` may be the back-end's enum member, its integer value or its name. An unknown code is an ``error``
(never a crash). Tables: :data:`HIGHS` (highspy ``HighsModelStatus``), :data:`SCIPY_HIGHS` (the status
integers of scipy's ``linprog``/``milp``, which wrap HiGHS), :data:`CPSAT` (``CpSolverStatus``),
:data:`PYWRAPLP` (``MPSolverResponseStatus`` of OR-Tools' linear solver wrapper: SCIP, HiGHS, CBC),
:data:`MIN_COST_FLOW` (``SimpleMinCostFlow.Status``) and :data:`CVXPY` (cvxpy's status strings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from moebalance.solution import Status

__all__ = ["StatusTable", "HIGHS", "SCIPY_HIGHS", "CPSAT", "PYWRAPLP", "MIN_COST_FLOW", "CVXPY", "TABLES"]

OPT, FEAS, LIMIT, INF, ERR = Status.OPTIMAL, Status.FEASIBLE, Status.TIME_LIMIT, Status.INFEASIBLE, Status.ERROR


@dataclasses.dataclass(frozen=True)
class StatusTable:
    """``table`` maps a back-end status name to ours; ``names`` turns an integer code into that name."""

    backend: str
    table: Mapping[str, Status]
    names: Callable[[], Mapping[int, str]] = dataclasses.field(default=lambda: {})

    def name(self, code: Any) -> str:
        """The back-end's name of ``code`` (an enum member, an int or a name)."""
        if isinstance(code, str):
            return code
        if hasattr(code, "name") and not isinstance(code, int):
            return str(code.name)
        try:
            return self.names().get(int(code), f"code {code!r}")
        except (TypeError, ValueError):
            return f"code {code!r}"

    def lookup(self, code: Any) -> Status:
        """Our status for ``code`` as the table gives it (unknown codes: ``error``)."""
        return self.table.get(self.name(code), ERR)

    def translate(self, code: Any, *, time_limit: float | None, has_solution: bool) -> Status:
        """Our status for a run that returned ``code``, given whether a time limit was set and whether the
        back-end returned an answer (see the module docstring)."""
        ours = self.lookup(code)
        if ours == LIMIT and time_limit is None:
            ours = FEAS if has_solution else ERR
        if ours in (OPT, FEAS) and not has_solution:
            ours = ERR
        return ours


def _highs_names() -> Mapping[int, str]:
    import highspy

    return {int(v): k for k, v in highspy.HighsModelStatus.__members__.items()}


def _cpsat_names() -> Mapping[int, str]:
    from ortools.sat import cp_model_pb2

    return {v: k for k, v in cp_model_pb2.CpSolverStatus.items()}


def _pywraplp_names() -> Mapping[int, str]:
    from ortools.linear_solver import linear_solver_pb2

    return {v: k for k, v in linear_solver_pb2.MPSolverResponseStatus.items()}


def _mcf_names() -> Mapping[int, str]:
    from ortools.graph.python import min_cost_flow

    return {int(v): k for k, v in min_cost_flow.SimpleMinCostFlow.Status.__members__.items()}


HIGHS = StatusTable(
    "highs",
    {
        "kOptimal": OPT,
        "kModelEmpty": OPT,
        "kTimeLimit": LIMIT,
        # limits we never set: stopped early with (maybe) an answer
        "kIterationLimit": FEAS,
        "kSolutionLimit": FEAS,
        "kObjectiveBound": FEAS,
        "kObjectiveTarget": FEAS,
        "kInfeasible": INF,
        "kUnboundedOrInfeasible": ERR,
        "kUnbounded": ERR,
        "kNotset": ERR,
        "kLoadError": ERR,
        "kModelError": ERR,
        "kPresolveError": ERR,
        "kSolveError": ERR,
        "kPostsolveError": ERR,
        "kUnknown": ERR,
        "kInterrupt": ERR,
        "kMemoryLimit": ERR,
        "kHighsInterrupt": ERR,
    },
    _highs_names,
)

# scipy.optimize.linprog / milp ``res.status``: 0 optimal, 1 iteration or time limit, 2 infeasible,
# 3 unbounded, 4 other (numerical difficulties)
SCIPY_HIGHS = StatusTable(
    "scipy-highs",
    {
        "optimal": OPT,
        "limit": LIMIT,
        "infeasible": INF,
        "unbounded": ERR,
        "other": ERR,
    },
    lambda: {0: "optimal", 1: "limit", 2: "infeasible", 3: "unbounded", 4: "other"},
)

CPSAT = StatusTable(
    "cp-sat",
    {
        "OPTIMAL": OPT,
        "FEASIBLE": LIMIT,  # an incumbent without proof: CP-SAT stopped at a limit
        "UNKNOWN": LIMIT,  # stopped before any incumbent
        "INFEASIBLE": INF,
        "MODEL_INVALID": ERR,
    },
    _cpsat_names,
)

PYWRAPLP = StatusTable(
    "pywraplp",
    {
        "MPSOLVER_OPTIMAL": OPT,
        "MPSOLVER_FEASIBLE": LIMIT,
        "MPSOLVER_NOT_SOLVED": LIMIT,
        "MPSOLVER_CANCELLED_BY_USER": LIMIT,
        "MPSOLVER_INFEASIBLE": INF,
        "MPSOLVER_UNBOUNDED": ERR,
        "MPSOLVER_ABNORMAL": ERR,
        "MPSOLVER_MODEL_IS_VALID": ERR,
        "MPSOLVER_UNKNOWN_STATUS": ERR,
        "MPSOLVER_MODEL_INVALID": ERR,
        "MPSOLVER_MODEL_INVALID_SOLUTION_HINT": ERR,
        "MPSOLVER_MODEL_INVALID_SOLVER_PARAMETERS": ERR,
        "MPSOLVER_SOLVER_TYPE_UNAVAILABLE": ERR,
        "MPSOLVER_INCOMPATIBLE_OPTIONS": ERR,
    },
    _pywraplp_names,
)

MIN_COST_FLOW = StatusTable(
    "min-cost-flow",
    {
        "OPTIMAL": OPT,
        "FEASIBLE": FEAS,
        "INFEASIBLE": INF,
        "NOT_SOLVED": ERR,
        "UNBALANCED": ERR,
        "BAD_RESULT": ERR,
        "BAD_COST_RANGE": ERR,
        "BAD_CAPACITY_RANGE": ERR,
    },
    _mcf_names,
)

CVXPY = StatusTable(
    "cvxpy",
    {
        "optimal": OPT,
        "optimal_inaccurate": FEAS,
        "user_limit": LIMIT,
        "infeasible": INF,
        "infeasible_inaccurate": ERR,
        "unbounded": ERR,
        "unbounded_inaccurate": ERR,
        "infeasible_or_unbounded": ERR,
        "solver_error": ERR,
    },
)

TABLES: dict[str, StatusTable] = {t.backend: t for t in (HIGHS, SCIPY_HIGHS, CPSAT, PYWRAPLP, MIN_COST_FLOW, CVXPY)}
