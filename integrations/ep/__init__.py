"""The expert-parallel runtime shared by :class:`~moebalance.integrations.distributed.ExpertParallelMoE` and
``moebalance.integrations.transformers.enable(model, expert_parallel=True)``.

- :mod:`.comm`: the communicator (every collective bounded by the process-group timeout), one error type;
- :mod:`.exchange`: one autograd operation for dispatch, expert compute and combine;
- :mod:`.planning`: per-step placement plans from the registry, one fallback policy, one plan broadcast;
- :mod:`.replicas`: replicated expert slots, their token split, live rebalancing and weight moves.
"""

from .comm import DEFAULT_TIMEOUT, Communicator, ExpertParallelError, init_process_group
from .exchange import Exchange, ExpertExchange, build_exchange, exchange, exchange_counts
from .planning import PROBLEM_OPTIONS, EPPlan, PlacementPlanner, agree, home_of
from .replicas import Rebalancer, RebalanceReport, ReplicaLayout, balancedness, move_slots, rank_moves, relabel

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
    "RebalanceReport",
    "Rebalancer",
    "ReplicaLayout",
    "balancedness",
    "move_slots",
    "rank_moves",
    "relabel",
]
