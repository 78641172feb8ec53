"""A ``transformers`` Trainer callback: per-layer expert balance in the Trainer's own logs, and a load trace.

>>> from moebalance.integrations import transformers as mbt
>>> from moebalance.integrations.trainer import MoEBalanceCallback
>>> mbt.enable(model, balancer="bip")
>>> trainer = Trainer(model=model, args=args, train_dataset=data)
>>> MoEBalanceCallback(trace_path="loads.npz").install(trainer)
>>> trainer.train()      # logs moe/max_vio, moe/max_vio/<layer>, ... at every logging step

:class:`MoEBalanceCallback` counts every forward of the :func:`~moebalance.integrations.transformers.enable`\\ d
model (a forward hook; the loads are the global ones under expert parallelism) and, at each of the Trainer's
log events, adds to ``logs`` -- the dict the Trainer hands to every callback's ``on_log``, which TensorBoard,
Weights & Biases and the other reporting integrations write -- and to ``state.log_history``:

- ``moe/max_vio``: MaxVio ``(max_e load_e - mean) / mean`` of each training forward since the last log event,
  averaged over the forwards and the MoE layers (AvgMaxVio); ``moe/max_vio_sup``: the largest over those
  forwards and layers; ``moe/balancedness``: mean / max load, averaged likewise;
- per layer (the MoE block's module name): ``moe/max_vio/<layer>``, ``moe/max_vio_sup/<layer>``, and with
  ``log_loads=True`` each expert's share of the layer's pairs, ``moe/load/<layer>/<e>``;
- at an evaluation's log event (keys ``eval_*``), the same over the evaluation forwards with the prefix
  ``eval_moe/``, plus ``eval_moe/max_vio_global`` (and ``/<layer>``): the MaxVio of the loads summed over the
  whole evaluation set.

The Trainer puts its reporting callbacks before the ones passed as ``callbacks=[...]``, so a callback added
there updates ``logs`` after TensorBoard / W&B have written them: :meth:`MoEBalanceCallback.install` puts it
first, so every reporter sees its metrics (passing it in ``callbacks=`` still fills ``state.log_history``).

``trace_path`` (``.npz`` or ``.json``): every training forward's per-layer loads, written at the end of
training (and at each checkpoint save) in the trace format of :mod:`._hf_trace`, which
:func:`~moebalance.integrations.transformers.read_trace`, :class:`~moebalance.PlacementProblem` and the
replication problem read. The trace is written by the process of ``state.is_world_process_zero`` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moebalance.integrations import transformers as mbt
from moebalance.integrations._hf_trace import LoadTrace
from torch import nn
from transformers import TrainerCallback

__all__ = ["MoEBalanceCallback"]


class _Bucket:
    """Per-layer sums over the forwards of one mode (training or evaluation) since the last log event."""

    def __init__(self, num_layers: int, num_experts: int):
        self.forwards = 0
        self.vio_sum = np.zeros(num_layers)
        self.vio_max = np.full(num_layers, -np.inf)
        self.bal_sum = np.zeros(num_layers)
        self.loads = np.zeros((num_layers, num_experts))
        self.pairs = np.zeros(num_layers)

    def add(self, loads: np.ndarray, tokens: int, top_k: int) -> None:
        """``loads [L, E]`` of one forward of ``tokens`` tokens."""
        mean = tokens * top_k / loads.shape[1]
        mx = loads.max(axis=1)
        vio = (mx - mean) / mean if mean > 0 else np.zeros(len(mx))
        self.forwards += 1
        self.vio_sum += vio
        self.vio_max = np.maximum(self.vio_max, vio)
        self.bal_sum += np.where(mx > 0, mean / np.maximum(mx, 1e-300), 1.0)
        self.loads += loads
        self.pairs += tokens * top_k


def _check_trace_path(path: Any) -> Path | None:
    if path is None:
        return None
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"`trace_path` must be a path ending in .npz or .json, got {path!r}")
    p = Path(path)
    if p.suffix not in (".npz", ".json"):
        raise ValueError(f"`trace_path` must end in .npz or .json, got {p.name!r}")
    return p


class MoEBalanceCallback(TrainerCallback):
    """Per-layer MaxVio and loads of an enabled model in the Trainer's logs; optionally a load trace.

    Args:
      trace_path: where to write the training forwards' ``[B, L, E]`` load trace (``.npz`` / ``.json``), or None.
      log_loads: also log each expert's share of its layer's pairs (``E`` metrics per layer).
      per_layer: log the per-layer metrics (``False``: only the means over the layers).
      prefix: the metric prefix (``"moe/"``; evaluation metrics get ``"eval_"`` in front).

    The model must be enabled (:func:`moebalance.integrations.transformers.enable`) before training starts;
    ``on_train_begin`` raises ValueError otherwise.
    """

    def __init__(
        self, trace_path: Any = None, *, log_loads: bool = False, per_layer: bool = True, prefix: str = "moe/"
    ):
        for name, v in (("log_loads", log_loads), ("per_layer", per_layer)):
            if not isinstance(v, bool):
                raise ValueError(f"`{name}` must be a bool, got {v!r}")
        if not isinstance(prefix, str):
            raise ValueError(f"`prefix` must be a string, got {prefix!r}")
        self.trace_path = _check_trace_path(trace_path)
        self.log_loads, self.per_layer, self.prefix = log_loads, per_layer, prefix
        self._model: nn.Module | None = None
        self._handle: Any = None
        self._buckets: dict[bool, _Bucket] = {}
        self._trace: list[tuple[np.ndarray, int]] = []
        self.layers: tuple[str, ...] = ()

    # -- wiring -------------------------------------------------------------------------------------------
    def install(self, trainer: Any) -> MoEBalanceCallback:
        """Put this callback first in ``trainer``'s callbacks (before the reporters); returns it."""
        handler = getattr(trainer, "callback_handler", None)
        if handler is None or not isinstance(getattr(handler, "callbacks", None), list):
            raise ValueError(f"`trainer` must be a transformers Trainer, got {type(trainer).__name__}")
        handler.callbacks[:] = [c for c in handler.callbacks if c is not self]
        handler.callbacks.insert(0, self)
        return self

    def attach(self, model: nn.Module) -> None:
        """Start counting the forwards of ``model`` (``on_train_begin`` does this with the Trainer's model)."""
        if self._model is model:
            return
        self.detach()
        blocks = mbt._state(model).blocks  # ValueError when the model is not enabled
        self.layers = tuple(b.name for b in blocks)
        self._blocks = blocks
        self._num_experts = blocks[0].num_experts
        self._top_k = blocks[0].top_k
        self._model = model
        self._handle = model.register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle, self._model = None, None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        lasts = [b.last for b in self._blocks]
        if any(x is None for x in lasts):
            return
        loads = torch.stack([x[0].detach().float() for x in lasts]).cpu().double().numpy()
        tokens = int(lasts[0][1])
        training = bool(module.training)
        if training not in self._buckets:
            self._buckets[training] = _Bucket(len(self._blocks), self._num_experts)
        self._buckets[training].add(loads, tokens, self._top_k)
        if training and self.trace_path is not None:
            self._trace.append((np.rint(loads).astype(np.int64), tokens))

    # -- metrics ------------------------------------------------------------------------------------------
    def metrics(self, training: bool = True, *, reset: bool = True) -> dict[str, float]:
        """The metrics of the forwards since the last call (``{}`` when there were none)."""
        b = self._buckets.pop(training, None) if reset else self._buckets.get(training)
        if b is None or b.forwards == 0:
            return {}
        pre = self.prefix if training else "eval_" + self.prefix
        vio = b.vio_sum / b.forwards
        out = {
            f"{pre}max_vio": float(vio.mean()),
            f"{pre}max_vio_sup": float(b.vio_max.max()),
            f"{pre}balancedness": float((b.bal_sum / b.forwards).mean()),
        }
        mean = b.pairs / self._num_experts
        glob = np.where(mean > 0, (b.loads.max(axis=1) - mean) / np.maximum(mean, 1e-300), 0.0)
        if not training:
            out[f"{pre}max_vio_global"] = float(glob.mean())
        if self.per_layer:
            for i, name in enumerate(self.layers):
                out[f"{pre}max_vio/{name}"] = float(vio[i])
                out[f"{pre}max_vio_sup/{name}"] = float(b.vio_max[i])
                if not training:
                    out[f"{pre}max_vio_global/{name}"] = float(glob[i])
        if self.log_loads:
            share = b.loads / np.maximum(b.pairs[:, None], 1)
            for i, name in enumerate(self.layers):
                for e in range(self._num_experts):
                    out[f"{pre}load/{name}/{e}"] = float(share[i, e])
        return out

    def trace(self) -> LoadTrace:
        """The ``[B, L, E]`` trace of the training forwards so far."""
        E = getattr(self, "_num_experts", 0)
        loads = (
            np.stack([x for x, _ in self._trace]) if self._trace else np.zeros((0, len(self.layers), E), dtype=np.int64)
        )
        model_type = str(getattr(getattr(self._model, "config", None), "model_type", "") or "")
        return LoadTrace(
            loads,
            np.array([t for _, t in self._trace], dtype=np.int64),
            getattr(self, "_top_k", 1),
            self.layers,
            model_type,
        )

    def _write_trace(self, state: Any) -> None:
        if self.trace_path is not None and self._model is not None and getattr(state, "is_world_process_zero", True):
            self.trace_path.parent.mkdir(parents=True, exist_ok=True)
            self.trace().save(self.trace_path)

    # -- Trainer events -----------------------------------------------------------------------------------
    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise ValueError("MoEBalanceCallback needs the Trainer's model")
        self.attach(model)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        evaluation = any(str(k).startswith("eval_") for k in logs)
        extra = self.metrics(training=not evaluation)
        if not extra:
            return
        history = getattr(state, "log_history", None)
        # the Trainer appended its own copy of `logs` (with "step") to log_history just before on_log
        same = (
            bool(history)
            and history[-1].get("step") == getattr(state, "global_step", None)
            and all(history[-1].get(k) == v for k, v in logs.items())
        )
        logs.update(extra)
        if same:
            history[-1].update(extra)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write_trace(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write_trace(state)  # the hook stays: a later trainer.evaluate() is still counted
