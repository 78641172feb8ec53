"""The communicator of the expert-parallel runtime: every collective and point-to-point call of a step goes
through :class:`Communicator`, which turns a failed or timed-out peer into one :class:`ExpertParallelError`.

Every wait is bounded by the process group's timeout (:func:`init_process_group`, :data:`DEFAULT_TIMEOUT`):
with gloo the collective itself raises when it expires; with NCCL the watchdog aborts the communicator
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default).
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ExpertParallelError", "Communicator", "init_process_group", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = datetime.timedelta(seconds=120)
"""Process-group timeout of :func:`init_process_group`: longer than any one step (plan, exchange, compute) of a
sane configuration, short enough that a dead or stuck peer surfaces within two minutes."""


class ExpertParallelError(RuntimeError):
    """A collective or point-to-point operation of the expert-parallel runtime failed (peer gone or timed out),
    another rank failed this step, or the ranks disagree on something they must share."""


def init_process_group(
    backend: str | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT, **kwargs: Any
) -> None:
    """``torch.distributed.init_process_group`` with the runtime's defaults.

    ``backend`` None picks "nccl" when CUDA is available, else "gloo". ``timeout`` (default
    :data:`DEFAULT_TIMEOUT`) bounds every wait for a peer. Other keyword arguments (``init_method``, ``rank``,
    ``world_size``, ``store``) pass through; without them the env:// variables that ``torchrun`` sets are used.
    With NCCL each process should call ``torch.cuda.set_device(local_rank)`` first.
    """
    if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"`timeout` must be a positive datetime.timedelta, got {timeout!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


class Communicator:
    """One step's view of ``group``: ``where`` names the step in errors; ``timings`` (a dict, or None) collects
    seconds per operation (CUDA synchronised around each when ``cuda``)."""

    def __init__(self, group: Any, where: str, timings: dict[str, float] | None = None, cuda: bool = False):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.where, self.timings, self.cuda = where, timings, cuda
        # the host tensors of headers and plans travel on the device NCCL needs; gloo takes CPU tensors
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the seconds spent inside to ``timings[what]`` when timing."""
        if self.timings is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

    def error(self, message: str) -> ExpertParallelError:
        return ExpertParallelError(f"rank {self.rank}/{self.world}: {message} ({self.where})")

    def run(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, its communication failures re-raised as ExpertParallelError naming rank, step and operation."""
        try:
            with self.timed(what):
                return fn()
        except ExpertParallelError:
            raise
        except RuntimeError as exc:  # gloo/nccl errors (DistBackendError, DistNetworkError, timeouts)
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: {what} failed in {self.where}: {type(exc).__name__}: "
                f"{str(exc).strip()[:600]}. Another rank probably raised, exited or is stuck; every wait is "
                f"bounded by the process group's timeout (init_process_group(timeout=...))."
            ) from exc

    def global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def all_gather(self, what: str, t: Tensor) -> Tensor:
        """``[P, *t.shape]`` on ``t``'s device."""
        if self.world == 1:
            return t[None]
        src = t.contiguous().to(self.device)
        out = [torch.empty_like(src) for _ in range(self.world)]
        self.run(what, lambda: dist.all_gather(out, src, group=self.group))
        return torch.stack(out).to(t.device)

    def all_gather_rows(self, what: str, t: Tensor, sizes: list[int]) -> Tensor:
        """Every rank's rows ``t [sizes[r], ...]`` concatenated rank-major (a padded all-gather)."""
        pad = max(sizes) - t.shape[0]
        got = self.all_gather(what, torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)))
        return torch.cat([got[r, : sizes[r]] for r in range(self.world)])

    def all_reduce(self, what: str, t: Tensor) -> Tensor:
        """Sum of ``t`` over the group, in place (and returned)."""
        if self.world > 1:
            buf = t if t.device == self.device else t.to(self.device)
            self.run(what, lambda: dist.all_reduce(buf, group=self.group))
            if buf is not t:
                t.copy_(buf)
        return t

    def broadcast(self, what: str, t: Tensor, src: int = 0) -> Tensor:
        """Group rank ``src``'s ``t`` on every rank (returned; in place when ``t`` is on the comm device)."""
        if self.world == 1:
            return t
        buf = t.to(self.device)
        self.run(what, lambda: dist.broadcast(buf, src=self.global_rank(src), group=self.group))
        return buf.to(t.device)

    def all_to_all(self, what: str, t: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """Rows ``t[sum(send[:d]) : sum(send[:d+1])]`` go to rank d; rows from rank s arrive in rank order
        (``all_to_all_single`` with uneven splits: gloo and NCCL both support it)."""
        if self.world == 1:
            return t
        out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
        self.run(
            what,
            lambda: dist.all_to_all_single(
                out, t.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=self.group
            ),
        )
        return out

    def p2p_start(
        self, what: str, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]
    ) -> list[Any]:
        """Post every ``(tensor, peer group rank, tag)`` send and receive at once (``batch_isend_irecv``) and return
        their works without waiting (wait them through :meth:`run`). The same call for gloo and NCCL."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.global_rank(p), self.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(p), self.group, tag) for t, p, tag in recvs]
        if not ops:
            return []
        return list(self.run(what, lambda: dist.batch_isend_irecv(ops)) or [])

    def p2p(self, what: str, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]) -> None:
        """Post every ``(tensor, peer group rank, tag)`` send and receive at once and wait for all of them."""
        works = self.p2p_start(what, sends, recvs)
        if works:
            self.run(what, lambda: [w.wait() for w in works])
