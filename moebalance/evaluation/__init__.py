"""Evaluation on top of the core: the placement simulator, the balancer training study, the report and the demos.

These modules use the core (``moebalance.routing``, ``placement``, ``registry``, ``compare``, the solvers and the
layers); nothing in the core imports them. Each is imported on use:

- :mod:`moebalance.evaluation.simulate`: one MoE layer's time and memory under each placement method.
- :mod:`moebalance.evaluation.study`: the balancer training study (a byte-level MoE language model).
- :mod:`moebalance.evaluation.report`: one Markdown report of the benchmark JSON files, with PNG plots.
- :mod:`moebalance.evaluation.demo`: ``moebalance demo``.
"""

__all__: list[str] = []
