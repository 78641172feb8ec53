"""Load statistics of an enabled transformers model: one layer's :class:`LayerStats` and the
:class:`LoadRecorder` that writes many forwards' loads as a trace."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from moebalance.integrations._hf_trace import LoadTrace
from torch import Tensor, nn


@dataclasses.dataclass
class LayerStats:
    """One MoE layer's last forward: ``loads [E]`` pairs per expert (global under expert parallelism),
    ``tokens``, ``top_k``, ``max_vio`` = (max - mean) / mean with mean = tokens * top_k / E, ``balancedness`` =
    mean / max (1 = perfect), ``aux_loss`` = ``aux_loss_coeff * E * sum_e f_e P_e`` (a measure for every
    balancer), ``bias [E]`` the current selection price (zeros for "none")."""

    layer: str
    loads: np.ndarray
    tokens: int
    top_k: int
    max_vio: float
    balancedness: float
    aux_loss: float
    bias: np.ndarray


class LoadRecorder:
    """Records every forward's per-layer loads of an enabled model; :meth:`trace` / :meth:`save` give the
    ``[B, L, E]`` trace of :mod:`._hf_trace`. Use as a context manager or call :meth:`close`.

    >>> with LoadRecorder(model) as rec:
    ...     for batch in batches: model(**batch)
    >>> rec.save("loads.npz")                      # read_trace("loads.npz").placement_problem(step, layer, P)
    """

    def __init__(self, model: nn.Module):
        from moebalance.integrations._hf_block import _state

        self._blocks = _state(model).blocks
        self._steps: list[tuple[Tensor, int]] = []
        self.model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        lasts = [b.last for b in self._blocks]
        if any(x is None for x in lasts):
            return
        self._steps.append((torch.stack([x[0] for x in lasts]), lasts[0][1]))

    @property
    def steps(self) -> int:
        return len(self._steps)

    def trace(self) -> LoadTrace:
        E = self._blocks[0].num_experts
        if self._steps:
            loads = np.rint(torch.stack([s for s, _ in self._steps]).cpu().double().numpy()).astype(np.int64)
        else:
            loads = np.zeros((0, len(self._blocks), E), dtype=np.int64)
        return LoadTrace(
            loads,
            np.array([t for _, t in self._steps], dtype=np.int64),
            self._blocks[0].top_k,
            tuple(b.name for b in self._blocks),
            self.model_type,
        )

    def save(self, path: Any) -> Any:
        return self.trace().save(path)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> LoadRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
