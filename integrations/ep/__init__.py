"""The expert-parallel runtime shared by :class:`~moebalance.integrations.distributed.ExpertParallelMoE` and
``moebalance.integrations.transformers.enable(model, expert_parallel=True)``.

- :mod:`.comm`: the communicator (every collective bounded by the process-group timeout), one error type;
- :mod:`.exchange`: one autograd operation for dispatch, expert compute and combine;
- :mod:`.planning`: per-step placement plans from the registry, one fallback policy, one plan broadcast;
- :mod:`.replicas`: replicated expert slots, their token split, live rebalancing and weight moves;
- :mod:`.runtime`: :class:`ExpertParallel` (the configuration) and :class:`ReplicatedExperts` (one layer's
  replicas: plan, window, asynchronous moves), used by both layers, and :func:`maybe_rebalance` for a model.
"""

from .comm import DEFAULT_TIMEOUT, Communicator, ExpertParallelError, init_process_group
from .exchange import Exchange, ExpertExchange, build_exchange, exchange, exchange_counts
from .planning import PROBLEM_OPTIONS, EPPlan, PlacementPlanner, agree, home_of, plans_on_every_rank
from .replicas import (
    PendingMove,
    Rebalancer,
    RebalanceReport,
    ReplicaLayout,
    balancedness,
    move_slots,
    rank_moves,
    relabel,
    start_move,
)
from .runtime import ExpertParallel, ReplicatedExperts, maybe_rebalance

__all__ = [
    "DEFAULT_TIMEOUT",
    "Communicator",
    "ExpertParallelError",
    "init_process_group",
    "Exchange",
    "ExpertExchange",
    "build_exchange",
    "exchange",
    "exchange_counts",
    "PROBLEM_OPTIONS",
    "EPPlan",
    "PlacementPlanner",
    "agree",
    "home_of",
    "plans_on_every_rank",
    "PendingMove",
    "start_move",
    "ExpertParallel",
    "ReplicatedExperts",
    "maybe_rebalance",
    "RebalanceReport",
    "Rebalancer",
    "ReplicaLayout",
    "balancedness",
    "move_slots",
    "rank_moves",
    "relabel",
]
