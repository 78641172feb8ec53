"""Replicated experts and live rebalancing of ExpertParallelMoE on CPU with gloo.

The pure parts (the token split over replicas, the relabelling, the move count) are checked in this process
against brute force; the layer is checked in subprocesses of this file (2 and 4 ranks), against the
single-process MoELayer: outputs and every gradient for each split (even, the dispatch LP), uneven and
zero-token ranks; a training run with a rebalance in the middle (weights and momentum move, and every later step
still equals the single-process run); a move budget; and a rank killed in the middle of a weight move.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HIDDEN, FFN, E, K = 12, 16, 8, 2
TOL = 2e-5


# ---------------------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------------------


def test_even_split_conserves_tokens_and_differs_by_at_most_one_per_replica():
    from moebalance.integrations.ep import ReplicaLayout

    rng = np.random.default_rng(3)
    for P, S in ((2, 5), (4, 3), (1, 9)):
        R = P * S
        phy2log = np.concatenate([np.arange(E), rng.integers(0, E, R - E)])
        rng.shuffle(phy2log)
        lay = ReplicaLayout(phy2log, E, P)
        for scale in (0, 1, 7, 10**9):
            loads = rng.integers(0, 50, E) * scale
            for split in ("even", "lp"):
                x = lay.assignment(loads, split)
                assert x.shape == (E, P) and x.min() >= 0
                assert np.array_equal(x.sum(axis=1), loads), (split, loads, x)
                held = np.stack([np.bincount(lay.local(r), minlength=E) for r in range(P)], axis=1)
                assert not (x[held == 0] > 0).any(), "tokens sent to a rank without a replica"
            x = lay.assignment(loads, "even")
            per_replica = x / np.maximum(
                np.stack([np.bincount(lay.local(r), minlength=E) for r in range(P)], axis=1), 1
            )
            for e in range(E):
                vals = per_replica[e][
                    np.stack([np.bincount(lay.local(r), minlength=E) for r in range(P)], axis=1)[e] > 0
                ]
                assert vals.max() - vals.min() <= 1 + 1e-9


def test_lp_split_is_never_worse_than_even_on_the_busiest_rank():
    from moebalance.integrations.ep import ReplicaLayout

    rng = np.random.default_rng(4)
    lay = ReplicaLayout(np.array([0, 1, 2, 3, 0, 4, 5, 6, 7, 0]), E, 2)
    for _ in range(20):
        loads = rng.integers(0, 100, E)
        loads[0] += 300
        even, lp = lay.assignment(loads, "even").sum(0).max(), lay.assignment(loads, "lp").sum(0).max()
        assert lp <= even + E  # rounding moves a rank by less than one token per slot


def test_relabel_keeps_the_objective_and_minimises_moves_by_brute_force():
    from moebalance.integrations.ep import rank_moves, relabel

    rng = np.random.default_rng(5)
    for P, S, E_ in ((2, 3, 4), (3, 2, 4), (3, 3, 6)):
        for _ in range(15):
            old = np.concatenate([np.arange(E_), rng.integers(0, E_, P * S - E_)])
            new = np.concatenate([np.arange(E_), rng.integers(0, E_, P * S - E_)])
            rng.shuffle(old)
            rng.shuffle(new)
            got = relabel(old, new, P)
            # the same multiset of experts per rank, up to a permutation of ranks: the same plan
            key = lambda a, P=P, S=S: sorted(tuple(sorted(r)) for r in a.reshape(P, S).tolist())  # noqa: E731
            assert key(got) == key(new)
            best = min(
                rank_moves(old, new.reshape(P, S)[list(perm)].reshape(-1), P)
                for perm in itertools.permutations(range(P))
            )
            assert rank_moves(old, got, P) == best <= rank_moves(old, new, P)
            # within a rank, every slot that can keep its expert does
            for r in range(P):
                o, g = old.reshape(P, S)[r], got.reshape(P, S)[r]
                kept = int((o == g).sum())
                most = int(np.minimum(np.bincount(o, minlength=E_), np.bincount(g, minlength=E_)).sum())
                assert kept == most


class _OneRank:
    rank, world = 0, 1


def test_rebalancer_honours_the_move_budget_and_the_gain_threshold():
    from moebalance.integrations.ep import Rebalancer, ReplicaLayout, rank_moves

    lay = ReplicaLayout.initial(E, 4, 3)  # 12 slots
    loads = np.array([400, 10, 10, 10, 300, 10, 10, 10], dtype=float)
    for budget in (0, 1, 2, 5):
        rb = Rebalancer("migrate", E, 4, 3, window_size=4, step_interval=1, max_moves=budget, min_gain=0.0)
        for _ in range(3):
            rb.record(loads)
        new, rep = rb.plan(_OneRank(), lay, step=3)
        assert rank_moves(lay.phy2log, new, 4) <= budget and rep.moves <= budget
        assert rep.balancedness_after >= rep.balancedness_before - 1e-12
        if budget >= 2:
            assert rep.applied and rep.gain > 0
    rb = Rebalancer("eplb", E, 4, 3, step_interval=1, min_gain=0.99)
    rb.record(loads)
    new, rep = rb.plan(_OneRank(), lay, step=1)
    assert not rep.applied and "min_gain" in rep.reason and np.array_equal(new, lay.phy2log)


class _FakeComm:
    """A rank of a group whose plans every rank computes itself (no collective is reached)."""

    def __init__(self, world: int):
        self.rank, self.world = 0, world

    def error(self, message: str) -> Exception:
        return AssertionError(message)


def test_rebalancer_judges_each_window_step_with_the_layers_split():
    """before / after are the mean over the window's steps of each step's balancedness under the split the layer
    runs (cross-checked with the integer split of ReplicaLayout.assignment), not the summed window's."""
    from moebalance.integrations.ep import Rebalancer, ReplicaLayout, balancedness

    rng = np.random.default_rng(8)
    P, S = 4, 3
    lay = ReplicaLayout.initial(E, P, S)
    steps = [rng.multinomial(2000, np.full(E, 1 / E)) for _ in range(6)]  # even on average, noisy per step
    for split in ("even", "lp"):
        rb = Rebalancer("eplb", E, P, S, window_size=6, step_interval=1, min_gain=0.0, split=split)
        for c in steps:
            rb.record(c)
        new, rep = rb.plan(_OneRank(), lay, step=6)
        checks = [(rep.balancedness_before, lay)]
        if rep.applied:  # rep.phy2log is the candidate plan only when it was applied
            checks.append((rep.balancedness_after, ReplicaLayout(rep.phy2log, E, P)))
        for got, layout in checks:
            want = np.mean([balancedness(layout.assignment(c, split).sum(0)) for c in steps])
            assert abs(got - want) < 3 * S / 500, (split, got, want)  # rounding: < 1 pair per slot per rank
        summed = np.sum(steps, axis=0).astype(float)
        cnt = lay.logcnt
        whole = balancedness((summed[lay.phy2log] / cnt[lay.phy2log]).reshape(P, S).sum(1))
        if split == "even":  # the summed window hides the per-step noise the even split keeps
            assert rep.balancedness_before < whole - 0.005, (rep.balancedness_before, whole)
    # the LP split absorbs that noise on the initial layout: no plan gains enough to move weights
    rb = Rebalancer("eplb", E, P, S, window_size=6, step_interval=1, min_gain=0.02, split="lp")
    for c in steps:
        rb.record(c)
    new, rep = rb.plan(_OneRank(), lay, step=6)
    assert not rep.applied and rep.balancedness_before > 0.99 and np.array_equal(new, lay.phy2log), rep


def test_a_placement_method_over_replicas_gives_a_conserving_plan_with_copies_only_where_needed():
    from moebalance.integrations.ep import ExpertParallel, ReplicatedExperts

    rng = np.random.default_rng(9)
    P = 4
    rx = ReplicatedExperts(
        ExpertParallel(num_local_slots=3, split="llep", split_options={"min_chunk": 1, "imbalance_threshold": None}),
        E,
        P,
        0,
    )
    lay = rx.layout
    held = np.stack([np.bincount(lay.local(r), minlength=E) for r in range(P)], axis=1) > 0  # [E, P]
    copied = 0
    for scale in (1, 1000):
        for _ in range(10):
            loads = rng.integers(0, 60, E) * scale
            loads[rng.integers(E)] += 900 * scale  # one hot expert
            plan = rx.plan(_FakeComm(P), loads)
            x = plan.assignment
            assert np.array_equal(x.sum(axis=1), loads) and x.min() >= 0
            lent = {(e, d) for e, _, d in plan.weight_transfers}
            for e, src, d in plan.weight_transfers:
                assert held[e, src] and not held[e, d], (e, src, d)
            for e, d in zip(*np.nonzero(x)):
                assert held[e, d] or (e, d) in lent, (e, d)
            even = lay.assignment(loads, "even").sum(0).max()
            assert x.sum(axis=0).max() <= even  # LLEP over the slots never loads the busiest rank more
            copied += len(plan.weight_transfers)
    assert copied > 0  # the hot expert's load was spilled to ranks without a replica


@pytest.mark.parametrize(
    "bad", [{"window_size": 0}, {"step_interval": -1}, {"min_gain": float("nan")}, {"max_moves": -2}]
)
def test_rebalancer_refuses_bad_options_by_name(bad):
    from moebalance.integrations.ep import Rebalancer

    with pytest.raises(ValueError, match=list(bad)[0]):
        Rebalancer("eplb", E, 2, 5, **bad)


@pytest.mark.parametrize(
    "bad, name",
    [
        ({"split": 3}, "split"),
        ({"split": "even", "split_options": {"min_chunk": 1}}, "split_options"),
        ({"split_options": [1]}, "split_options"),
        ({"async_moves": "yes"}, "async_moves"),
        ({"num_local_slots": 0}, "num_local_slots"),
        ({"window_size": 0}, "window_size"),
        ({"replication": 7}, "replication"),
    ],
)
def test_expert_parallel_config_refuses_bad_options_by_name(bad, name):
    from moebalance.integrations.ep import ExpertParallel

    with pytest.raises(ValueError, match=name):
        ExpertParallel(**bad)


def test_replicated_experts_refuse_an_unknown_split_method_and_too_few_slots():
    from moebalance.integrations.ep import ExpertParallel, ReplicatedExperts

    with pytest.raises(ValueError, match="nope"):
        ReplicatedExperts(ExpertParallel(split="nope"), E, 2, 0)
    with pytest.raises(ValueError, match="num_local_slots"):
        ReplicatedExperts(ExpertParallel(num_local_slots=3), E, 2, 0)  # fewer than the 4 home experts
    with pytest.raises(ValueError, match="min_gain"):
        ReplicatedExperts(ExpertParallel(replication="eplb", min_gain=2.0), E, 2, 0)


def test_unknown_replication_method_is_refused():
    from moebalance.integrations.ep import Rebalancer

    with pytest.raises(ValueError, match="nope"):
        Rebalancer("nope", E, 2, 5)


# ---------------------------------------------------------------------------------------------------------
# the layer, in subprocesses
# ---------------------------------------------------------------------------------------------------------


def _launch(mode: str, world: int, out: Path, limit: float = 150.0) -> tuple[list[dict], list[int], str]:
    """This file's workers, started and collected as the expert-parallel layer's own tests do."""
    from tests.integrations.test_distributed import _launch as launch_ranks

    return launch_ranks(mode, world, out, limit=limit, script=__file__)


def _tokens(world: int, seed: int, case: str):
    import torch

    g = torch.Generator().manual_seed(seed)
    Ts = [20 + 6 * r for r in range(world)]
    if case == "empty":
        Ts = [0 if r % 2 else t for r, t in enumerate(Ts)]
    x = torch.randn(sum(Ts), HIDDEN, generator=g)
    if case != "balanced":  # most tokens lean on expert 0
        hot = torch.rand(sum(Ts), generator=g) < 0.8
        x[hot, 0] += 4.0
    return Ts, x


def _reference(seed: int):
    import torch
    from moebalance.integrations.torch import MoEConfig, MoELayer

    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(hidden=HIDDEN, ffn=FFN, num_experts=E, top_k=K, backend="torch", dtype=torch.float32))
    with torch.no_grad():
        layer.router.weight[0] = 3.0 * torch.nn.functional.one_hot(torch.tensor(0), HIDDEN).float()
    return layer


def _rel(a, b) -> float:
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _errors(rank, Ts, x, ref, ep) -> dict:
    """One forward and backward of both layers on the same tokens: the largest relative differences."""
    import torch

    s = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))
    w_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    for p in list(ref.parameters()) + list(ep.parameters()):
        p.grad = None
    xr = x.clone().requires_grad_()
    ((ref(xr) * w_out).sum()).backward()
    xl = x[s].clone().requires_grad_()
    y = ep(xl)
    (y * w_out[s]).sum().backward()
    ep.allreduce_router_grad()
    yr = ref(x.clone())
    idx = torch.from_numpy(ep.local_experts)
    return {
        "out": _rel(y, yr[s].detach()),
        "dx": _rel(xl.grad, xr.grad[s]),
        "router": _rel(ep.router.weight.grad, ref.router.weight.grad),
        **{n: _rel(getattr(ep, n).grad, getattr(ref, n).grad[idx]) for n in ("w_gate", "w_up", "w_down")},
    }


def _worker(mode: str, rank: int, world: int, port: int, out: Path) -> None:
    import torch
    from moebalance.integrations.distributed import ExpertParallelError, ExpertParallelMoE, init_process_group

    torch.set_num_threads(1)
    timeout = {"killed": 4.0, "dropped": 20.0}.get(mode, 60.0)
    init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout),
    )
    n = E // world
    res: dict = {"rank": rank}
    if mode == "equivalence":
        res["cases"] = []
        for case, split, slots in (
            ("skew", "even", n + 1),
            ("empty", "even", n + 1),
            ("skew", "lp", n + 2),
            ("balanced", "even", n),
        ):
            ref = _reference(11)
            ep = ExpertParallelMoE.from_layer(ref, num_local_slots=slots, replica_split=split)
            Ts, x = _tokens(world, 5, case)
            errs = _errors(rank, Ts, x, ref, ep)
            res["cases"].append(
                {
                    "case": case,
                    "split": split,
                    "errors": errs,
                    "assignment": ep.last_plan.assignment.tolist(),
                    "logcnt": ep.layout.logcnt.tolist(),
                    "exchange": ep.last_exchange,
                }
            )
    elif mode == "training":  # SGD with momentum; a rebalance after step 3 moves weights and momentum
        ref = _reference(12)
        ep = ExpertParallelMoE.from_layer(
            ref,
            num_local_slots=n + 1,
            replication="eplb",
            window_size=3,
            step_interval=3,
            min_gain=0.0,
            async_moves=True,  # the move overlaps the next step's routing; the forward waits for it
        )
        opt_r = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
        opt_e = torch.optim.SGD(ep.parameters(), lr=0.05, momentum=0.9)
        res["steps"] = []
        for step in range(6):
            Ts, x = _tokens(world, 100 + step, "skew")
            s = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))
            w_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
            opt_r.zero_grad()
            opt_e.zero_grad()
            (ref(x) * w_out).sum().backward()
            (ep(x[s]) * w_out[s]).sum().backward()
            ep.allreduce_router_grad()
            opt_r.step()
            opt_e.step()
            rep = ep.maybe_rebalance(opt_e)
            idx = torch.from_numpy(ep.local_experts)
            errs = {
                nm: _rel(getattr(ep, nm).detach(), getattr(ref, nm).detach()[idx])
                for nm in ("w_gate", "w_up", "w_down")
            }
            errs["router"] = _rel(ep.router.weight.detach(), ref.router.weight.detach())
            errs["momentum"] = _rel(
                opt_e.state[ep.w_gate]["momentum_buffer"], opt_r.state[ref.w_gate]["momentum_buffer"][idx]
            )
            res["steps"].append(
                {
                    "errors": errs,
                    "balancedness": float(ep.last_plan.device_loads.mean() / ep.last_plan.device_loads.max()),
                    "rebalance": None
                    if rep is None
                    else {
                        "applied": rep.applied,
                        "moves": rep.moves,
                        "bytes_moved": rep.bytes_moved,
                        "before": rep.balancedness_before,
                        "after": rep.balancedness_after,
                        "phy2log": rep.phy2log.tolist(),
                    },
                }
            )
    elif mode == "budget":
        ref = _reference(13)
        ep = ExpertParallelMoE.from_layer(
            ref, num_local_slots=n + 2, replication="migrate", max_moves=1, step_interval=1, min_gain=0.0
        )
        res["moves"] = []
        for step in range(3):
            Ts, x = _tokens(world, 200 + step, "skew")
            s = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))
            with torch.no_grad():
                ep(x[s])
            before = ep.layout.phy2log.copy()
            rep = ep.rebalance()
            ep.wait_moves()  # the move runs asynchronously; the layout changes when it completes
            from moebalance.integrations.ep import rank_moves

            res["moves"].append([rep.moves, rank_moves(before, ep.layout.phy2log, world), rep.applied])
    elif mode == "killed":  # rank 1 dies inside the weight move; rank 0 must raise, weights untouched
        ref = _reference(14)
        ep = ExpertParallelMoE.from_layer(
            ref, num_local_slots=n + 1, replication="eplb", step_interval=1, min_gain=0.0, async_moves=True
        )
        Ts, x = _tokens(world, 300, "skew")
        s = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))
        with torch.no_grad():
            ep(x[s])
        if rank == 1:
            from moebalance.integrations.ep import comm as comm_mod

            real = comm_mod.Communicator.p2p_start

            def dying(self, what, sends, recvs):
                if what.startswith("expert weight move"):  # posting the move: rank 0 waits on a dead peer
                    print("rank 1 dies in the weight move", flush=True)
                    os._exit(3)
                return real(self, what, sends, recvs)

            comm_mod.Communicator.p2p_start = dying
        w0, lay0 = ep.w_gate.detach().clone(), ep.layout.phy2log.copy()
        t0 = time.monotonic()
        try:
            ep.rebalance()  # posts the move; the wait (here, or the next forward) meets the dead peer
            ep.wait_moves()
            res["error"] = "no error"
        except ExpertParallelError as exc:
            res["error"] = f"ExpertParallelError: {exc}"
        res["seconds"], res["timeout"] = time.monotonic() - t0, timeout
        res["unchanged"] = bool(torch.equal(ep.w_gate.detach(), w0) and np.array_equal(ep.layout.phy2log, lay0))
    elif mode == "dropped":  # a layer dropped with a large move in flight: the group must keep working
        import gc

        from moebalance.integrations.torch import MoEConfig, MoELayer

        torch.manual_seed(15)
        big = MoELayer(MoEConfig(hidden=512, ffn=1024, num_experts=E, top_k=K, backend="torch", dtype=torch.float32))
        with torch.no_grad():
            big.router.weight[0] = 3.0 * torch.nn.functional.one_hot(torch.tensor(0), 512).float()
        ep = ExpertParallelMoE.from_layer(
            big, num_local_slots=n + 1, replication="eplb", step_interval=1, min_gain=0.0, async_moves=True
        )
        x = torch.randn(64, 512, generator=torch.Generator().manual_seed(rank))
        x[:, 0] += 4.0
        with torch.no_grad():
            ep(x)
        rep = ep.rebalance()
        res["applied"], res["pending"] = rep.applied, ep.replicas.pending is not None
        res["bytes"] = rep.bytes_moved
        del ep, rep
        gc.collect()
        t0 = time.monotonic()
        try:
            ok = torch.ones(1)
            torch.distributed.all_reduce(ok)
            torch.distributed.barrier()
            ref = _reference(16)  # and a fresh replicated layer still runs
            small = ExpertParallelMoE.from_layer(ref, num_local_slots=n + 1)
            Ts, xs = _tokens(world, 301, "skew")
            with torch.no_grad():
                small(xs[sum(Ts[:rank]) : sum(Ts[: rank + 1])])
            res["error"] = "" if int(ok) == world else f"all_reduce gave {int(ok)}"
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"[:300]
        res["seconds"] = time.monotonic() - t0
    (out / f"{mode}-{rank}.json").write_text(json.dumps(res))
    os._exit(0)


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_layer_equals_single_process(world, tmp_path):
    results, codes, log = _launch("equivalence", world, tmp_path)
    assert codes == [0] * world, log
    for i, case in enumerate(results[0]["cases"]):
        for r in results:
            bad = {k: v for k, v in r["cases"][i]["errors"].items() if v > TOL}
            assert not bad, (case["case"], case["split"], r["rank"], bad)
            assert r["cases"][i]["assignment"] == case["assignment"], "ranks disagree on the split"
        x = np.asarray(case["assignment"])
        if case["case"] != "balanced":
            assert max(case["logcnt"]) > 1 and (x > 0).sum(axis=1).max() > 1, "no expert was split (vacuous)"
        if case["case"] == "empty":  # a zero-token rank computes other ranks' tokens on its replicas
            ex = [r["cases"][i]["exchange"] for r in results]
            assert any(e["sent"] == 0 and e["received"] > 0 for e in ex), ex


def test_rebalance_in_the_middle_of_training_keeps_the_single_process_run(tmp_path):
    results, codes, log = _launch("training", 2, tmp_path)
    assert codes == [0, 0], log
    for r in results:
        for i, st in enumerate(r["steps"]):
            bad = {k: v for k, v in st["errors"].items() if v > 1e-4}
            assert not bad, (r["rank"], i, bad)
    reps = [st["rebalance"] for st in results[0]["steps"]]
    assert reps[2] is not None and reps[5] is not None and all(rp is None for rp in reps[:2] + reps[3:5])
    first = reps[2]
    assert first["applied"] and first["moves"] > 0, first
    assert first["after"] > first["before"]
    assert sum(r["steps"][2]["rebalance"]["bytes_moved"] for r in results) > 0
    # the plan in force after the rebalance is the reported one, on both ranks (the router drifts during this
    # run, so realised balancedness is measured in benchmarks/ep_rebalance.py on fixed loads, not here)
    assert results[1]["steps"][2]["rebalance"]["phy2log"] == first["phy2log"]


def test_move_budget_is_honoured_by_the_layer(tmp_path):
    results, codes, log = _launch("budget", 2, tmp_path)
    assert codes == [0, 0], log
    for r in results:
        assert r["moves"] == results[0]["moves"]
        for reported, actual, _applied in r["moves"]:
            assert reported == actual <= 1
    assert any(applied and actual == 1 for _, actual, applied in results[0]["moves"]), results[0]["moves"]


def test_a_rank_killed_mid_move_gives_a_clear_error_and_no_mixed_weights(tmp_path):
    results, codes, log = _launch("killed", 2, tmp_path, limit=60)
    assert codes[1] == 3 and "dies in the weight move" in log, log
    r0 = results[0]
    assert r0["error"].startswith("ExpertParallelError") and "rank 0/2" in r0["error"], r0
    assert r0["seconds"] < r0["timeout"] + 3.0
    assert r0["unchanged"]


def test_a_layer_dropped_with_a_move_in_flight_leaves_the_group_working(tmp_path):
    results, codes, log = _launch("dropped", 2, tmp_path, limit=90)
    assert codes == [0, 0], log
    assert any(r["applied"] and r["pending"] for r in results), results  # a move was in flight when dropped
    assert sum(r["bytes"] for r in results) > 4 << 20, results  # and a large one (several MiB)
    for r in results:
        assert r["error"] == "", r


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
