"""ExpertParallelMoE on CPU with gloo: outputs and every gradient against the single-process MoELayer.

Each test launches its ranks as subprocesses of this file (``python tests/integrations/test_distributed.py --worker ...``),
joined by a gloo process group on 127.0.0.1 at a free port. A worker builds the same seeded ``MoELayer`` on
every rank, runs it single-process on the rank-major concatenation of all ranks' tokens (the reference), then
runs ``ExpertParallelMoE.from_layer`` on its own tokens, and writes the largest differences, its plan and its
exchange counts as JSON; the assertions are made here, in the parent. One launch runs many cases, because
starting a process that imports torch costs seconds on a 2-core machine.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HIDDEN, FFN, E, K = 12, 20, 8, 2
TOL = 2e-5  # relative to the reference's largest magnitude: float reordering only


# ---------------------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    mode: str, world: int, out: Path, limit: float = 120.0, stop_others: bool = False, script: str = __file__
) -> tuple[list[dict], list[int], str]:
    """Run ``world`` workers of ``mode`` (``script --worker mode rank world port out``, this file's by default);
    (per-rank JSON results, exit codes, combined output).

    ``stop_others``: once rank 0 has exited, kill the other ranks (a deliberately stuck rank never ends)."""
    port = _free_port()
    # TRITON_INTERPRET off: tests/moe_testing.py turns it on in this process for the kernel tests, and with it
    # backend="triton" would run on CPU tensors (the option test expects both layers to refuse it there)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRITON_INTERPRET="0")
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--worker", mode, str(r), str(world), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + limit
    logs = []
    for i, p in enumerate(procs):
        if stop_others and i > 0:
            p.kill()
        try:
            logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{mode} at world size {world} did not finish in {limit} s (a hang)")
    text = "\n".join(f"--- rank {r} ---\n{log}" for r, log in enumerate(logs))
    results = []
    for r in range(world):
        f = out / f"{mode}-{r}.json"
        results.append(json.loads(f.read_text()) if f.exists() else {})
    return results, [p.returncode for p in procs], text


# ---------------------------------------------------------------------------------------------------------
# the worker side (runs in the subprocesses)
# ---------------------------------------------------------------------------------------------------------


def _inputs(case: str, world: int, seed: int, hidden: int = HIDDEN):
    """Per-rank token counts and the rank-major ``x_all [T_all, hidden]`` for a routing case."""
    import torch

    g = torch.Generator().manual_seed(seed)
    Ts = [24 + 4 * r for r in range(world)]
    if case == "empty":
        Ts = [0 if r % 2 else t for r, t in enumerate(Ts)]
    x = torch.randn(sum(Ts), hidden, generator=g)
    if case in ("skew95", "empty"):
        # 95% of the tokens lean hard on the direction the router maps to expert 0 (home: rank 0)
        hot = torch.rand(sum(Ts), generator=g) < 0.95
        x[hot] += 4.0 * torch.nn.functional.one_hot(torch.tensor(0), hidden).float()
    return Ts, x


def _layer(seed: int, case: str, **config):
    import torch
    from moebalance.integrations.torch import MoEConfig, MoELayer

    torch.manual_seed(seed)
    config.setdefault("dtype", torch.float32)
    config.setdefault("num_experts", E)
    config.setdefault("hidden", HIDDEN)
    config.setdefault("ffn", FFN)
    config.setdefault("top_k", K)
    config.setdefault("backend", "torch")
    layer = MoELayer(MoEConfig(**config))
    hidden = config["hidden"]
    with torch.no_grad():
        if case in ("skew95", "empty"):
            layer.router.weight[0] = 3.0 * torch.nn.functional.one_hot(torch.tensor(0), hidden).float()
        if case == "all_one":
            layer.bias[0] = -10.0  # a price below every other: every token picks expert 0
    return layer


def _diff(a, b) -> float:

    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def _run_case(
    rank: int,
    world: int,
    case: str,
    placement: str,
    options: dict,
    steps: int = 1,
    train: bool = False,
    check_plans: bool = True,
    **config,
) -> dict:
    """One case: the EP layer against the single-process layer for ``steps`` steps; errors and plan as a dict.

    ``check_plans``: the EP layer runs the full shared check on every plan (its debug flag) on top of the cheap
    invariant check of the hot path."""
    import torch
    import torch.distributed as dist
    from moebalance.integrations.distributed import ExpertParallelMoE

    seed = 1234 + sum(map(ord, case + placement))
    layer = _layer(seed, case, **config)
    layer.train(train)
    ep = ExpertParallelMoE.from_layer(layer, placement=placement, check_plans=check_plans, **options)
    lo, hi = ep.home_experts.start, ep.home_experts.stop
    res: dict = {
        "case": case,
        "placement": placement,
        "options": options,
        "errors": {},
        "plans": [],
        "exchange": [],
        "loads": [],
        "tol": TOL if layer.w_gate.dtype == torch.float32 else 2e-2,
    }
    for step in range(steps):
        Ts, x_all = _inputs(case, world, seed + step, layer.config.hidden)
        s = slice(sum(Ts[:rank]), sum(Ts[: rank + 1]))
        w_out = torch.randn(x_all.shape, generator=torch.Generator().manual_seed(seed + 99 + step))
        for p in list(layer.parameters()) + list(ep.parameters()):
            p.grad = None
        xr = x_all.clone().requires_grad_()
        yr = layer(xr)
        ((yr * w_out).sum() + layer.aux_loss).backward()
        xl = x_all[s].clone().requires_grad_()
        y = ep(xl)
        ((y * w_out[s]).sum() + ep.aux_loss).backward()
        ep.allreduce_router_grad()
        aux = ep.aux_loss.detach().clone()
        dist.all_reduce(aux)
        errs = {
            "out": _diff(y, yr[s]),
            "dx": _diff(xl.grad, xr.grad[s]),
            "router": _diff(ep.router.weight.grad, layer.router.weight.grad),
            "w_gate": _diff(ep.w_gate.grad, layer.w_gate.grad[lo:hi]),
            "w_up": _diff(ep.w_up.grad, layer.w_up.grad[lo:hi]),
            "w_down": _diff(ep.w_down.grad, layer.w_down.grad[lo:hi]),
            "aux": abs(float(aux) - float(layer.aux_loss)),
            "bias": float((ep.bias - layer.bias).abs().max()),
        }
        for key, v in errs.items():
            res["errors"][key] = max(res["errors"].get(key, 0.0), v)
        res["plans"].append(ep.last_plan.assignment.tolist())
        res["used"] = ep.last_plan.used
        res["exchange"].append(ep.last_exchange)
        res["loads"].append(layer.last_stats.loads.tolist())
        res.setdefault("max_vio", []).append(float(layer.last_stats.max_vio))
        res.setdefault("ep_max_vio", []).append(float(ep.last_stats.max_vio))
        res.setdefault("bias", []).append(ep.bias.tolist())
        res["dropped"] = int(layer.last_stats.dropped)
        res.setdefault("ep_dropped", []).append(int(ep.last_stats.dropped))
        res.setdefault("ref_dropped", []).append(int(layer.last_stats.dropped))
        res["ref_scale"] = float(yr.abs().max())
        with torch.no_grad():  # both layers take the same SGD step, so step 2 starts from equal weights again
            for p in layer.parameters():
                p -= 0.1 * p.grad
            for p, full in ((ep.w_gate, layer.w_gate), (ep.w_up, layer.w_up), (ep.w_down, layer.w_down)):
                p.copy_(full[lo:hi])
            ep.router.weight.copy_(layer.router.weight)
    return res


def _equivalence_cases(world: int) -> list[tuple]:
    llep = {
        "balanced": {"min_chunk": 4},
        "skew95": {"min_chunk": 4},
        "all_one": {"min_chunk": 4},
        "empty": {"min_chunk": 1, "imbalance_threshold": None},
    }  # empty: any excess spills to the idle rank
    cases = [
        (c, m, llep[c] if m == "llep" else {}, {})
        for c in ("balanced", "skew95", "empty", "all_one")
        for m in ("ep", "llep")
    ]
    if world == 2:
        cases += [
            ("skew95", "llep+", {"min_chunk": 4}, {}),
            ("skew95", "eplb", {}, {}),
            ("skew95", "milp", {"time_limit": 5.0}, {}),  # not replicated: solved on rank 0 and broadcast
            # a time limit it cannot meet: status time_limit, so the layer falls back to llep (on every rank)
            ("skew95", "llep+", {"min_chunk": 4, "time_limit": 1e-9}, {}),
            ("skew95", "llep", {"min_chunk": 4, "max_tokens_per_device": 60, "max_foreign_experts": 1}, {}),
            ("all_one", "llep", {"min_chunk": 1, "imbalance_threshold": None}, {"top_k": 1}),
            ("skew95", "llep", {"min_chunk": 4}, {"dtype": "bfloat16"}),  # bf16 over gloo, looser tolerance
        ]
    if world == 4:
        cases += [("skew95", "llep", {"min_chunk": 4, "max_tokens_per_device": 70, "max_foreign_experts": 2}, {})]
    return cases


def _balancer_cases() -> list[tuple]:
    return [
        ("skew95", "llep", {"min_chunk": 4}, {"balancer": "loss_free", "bias_update_rate": 0.05}),
        ("skew95", "llep", {"min_chunk": 4}, {"balancer": "bip"}),
        ("skew95", "llep", {"min_chunk": 4}, {"balancer": "aux_loss", "aux_loss_coeff": 0.5}),
        ("skew95", "llep", {"min_chunk": 4}, {"capacity_factor": 1.0}),
        ("balanced", "ep", {}, {"router": "sigmoid", "normalize_gates": False}),
    ]


def _run_option(rank: int, world: int, case: dict) -> dict:
    """One option case; a config both layers must refuse records each layer's ValueError instead."""
    import torch
    from moebalance.integrations.distributed import ExpertParallelMoE

    config = dict(case["config"])
    if case.get("refused"):
        layer = _layer(1, "skew95", **config)
        ep = ExpertParallelMoE.from_layer(layer, placement="llep", min_chunk=4)
        got = {}
        for name, mod in (("layer", layer), ("ep", ep)):
            try:
                mod(torch.randn(8, layer.config.hidden))
                got[name] = "no error"
            except ValueError as exc:
                got[name] = f"ValueError: {exc}"
        return {"refused": got}
    return _run_case(rank, world, "skew95", "llep", {"min_chunk": 4}, steps=2, train=True, check_plans=False, **config)


def _worker(mode: str, rank: int, world: int, port: int, out: Path) -> None:
    import torch
    from moebalance.integrations.distributed import ExpertParallelError, ExpertParallelMoE, init_process_group

    torch.set_num_threads(1)
    # a long timeout for start-up and the healthy steps (a loaded machine may start one rank seconds after the
    # other); the fault steps get their own group with a short one
    init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60.0),
    )
    result: dict = {"rank": rank}
    path = out / f"{mode}-{rank}.json"
    if (
        mode == "options"
    ):  # tests/integrations/test_layer_options.py: one case per MoEConfig option, hot path (no debug check)
        cases = json.loads((out / "options.json").read_text())
        result["cases"] = [_run_option(rank, world, c) for c in cases]
    elif mode == "equivalence":
        result["cases"] = [_run_case(rank, world, c, m, o, **cfg) for c, m, o, cfg in _equivalence_cases(world)]
        if world == 2:  # one launch less: the training-mode cases ride along
            result["balancers"] = [
                _run_case(rank, world, c, m, o, steps=2, train=True, **cfg) for c, m, o, cfg in _balancer_cases()
            ]
    elif mode.startswith("fault"):
        layer = _layer(7, "skew95")
        bad_options = []  # bad arguments: a ValueError naming them, raised at construction on every rank
        for kwargs in ({"placement": "nope"}, {"placement": "llep", "bogus": 1}, {"placement": "llep", "alpha": -1}):
            try:
                ExpertParallelMoE.from_layer(layer, **kwargs)
                bad_options.append("no error")
            except ValueError as exc:
                bad_options.append(str(exc))
        try:
            ExpertParallelMoE.from_layer(_layer(7, "skew95", num_experts=3, top_k=1))
            bad_options.append("no error")
        except ValueError as exc:
            bad_options.append(str(exc))
        result["bad_options"] = bad_options
        ep = ExpertParallelMoE.from_layer(layer, placement="llep", min_chunk=4)
        import numpy as np_

        refused = {}  # every rank passes the same bad input: each raises its own ValueError naming `x`
        for name, bad in (
            ("numpy", np_.zeros((4, HIDDEN), dtype=np_.float32)),
            ("0-d", torch.tensor(1.0)),
            ("int", torch.ones(4, HIDDEN, dtype=torch.int64)),
            ("bool", torch.ones(4, HIDDEN, dtype=torch.bool)),
            ("complex", torch.ones(4, HIDDEN, dtype=torch.complex64)),
        ):
            try:
                ep(bad)
                refused[name] = "no error"
            except ValueError as exc:
                refused[name] = f"ValueError: {exc}"
            except Exception as exc:
                refused[name] = f"{type(exc).__name__}: {exc}"
        result["refused_inputs"] = refused
        x = torch.randn(16, HIDDEN)
        # 1. bad input on rank 1: rank 1 raises its ValueError, the others learn it from the header at once
        t0 = time.monotonic()
        try:
            ep(torch.randn(16, HIDDEN + 1) if rank == 1 else x)
            result["bad_input"] = "no error"
        except (ValueError, ExpertParallelError) as exc:
            result["bad_input"] = f"{type(exc).__name__}: {exc}"
        result["bad_input_s"] = time.monotonic() - t0
        ep(x).sum().backward()  # the group is still usable after that
        result["recovered"] = True
        path.write_text(json.dumps(result))
        # 2. rank 1 raises outside the layer, then either exits ("fault_exit") or stays alive and stuck
        # ("fault_stuck": no connection closes, so only the timeout can end rank 0's wait). Both ranks make the
        # short-timeout group together just before, so the timeout only ever measures the fault.
        import torch.distributed as dist

        timeout = 3.0
        short = dist.new_group(timeout=datetime.timedelta(seconds=timeout))
        ep = ExpertParallelMoE.from_layer(layer, group=short, placement="llep", min_chunk=4)
        if rank == 1:
            try:
                raise RuntimeError("injected failure on rank 1")
            except RuntimeError:
                if mode == "fault_exit":
                    raise
                print("injected failure on rank 1 (caught; this rank now hangs)", flush=True)
                time.sleep(10 * timeout)
        t0 = time.monotonic()
        try:
            ep(x).sum().backward()
            result["fault"] = "no error"
        except ExpertParallelError as exc:
            result["fault"] = f"{type(exc).__name__}: {exc}"
        result["fault_s"] = time.monotonic() - t0
        result["timeout_s"] = timeout
    path.write_text(json.dumps(result))
    os._exit(0)  # skip the process-group teardown: a failed peer can make it block


# ---------------------------------------------------------------------------------------------------------
# the tests (parent side)
# ---------------------------------------------------------------------------------------------------------


def _check_equivalence(results: list[dict], world: int) -> None:
    by_rank = [r["cases"] for r in results]
    for i, case in enumerate(by_rank[0]):
        name = f"{case['case']}/{case['placement']} at P={world}"
        for rank_cases in by_rank:
            c = rank_cases[i]
            bad = {k: v for k, v in c["errors"].items() if v > c["tol"]}
            assert not bad, f"{name}: rank {by_rank.index(rank_cases)} differs from the single-process layer: {bad}"
            assert c["ep_dropped"] == c["ref_dropped"], name
            # the plan is identical on every rank
            assert c["plans"] == case["plans"], f"{name}: ranks computed different plans"
        plan = np.asarray(case["plans"][0])
        loads = np.asarray(case["loads"][0])
        assert np.array_equal(plan.sum(axis=1), loads), f"{name}: plan does not conserve the loads"
        received = [rank_cases[i]["exchange"][0]["computed"] for rank_cases in by_rank]
        assert received == plan.sum(axis=0).tolist(), f"{name}: rows received differ from the plan"
        copies = [len(rank_cases[i]["exchange"][0]["copies"]) for rank_cases in by_rank]
        if case["placement"] == "ep":
            assert sum(copies) == 0
        if (
            case["case"] in ("skew95", "all_one")
            and case["placement"] in ("llep", "llep+")
            and case["used"] == case["placement"]
            and world > 1
        ):
            # the hot expert really was split, so the copies and their gradients were exercised
            assert sum(copies) > 0, f"{name}: LLEP moved nothing (the case would be vacuous)"
            assert (plan > 0).sum(axis=1).max() > 1
        if case["case"] == "skew95":
            assert loads[0] >= 0.9 * loads.sum() / K, f"{name}: expert 0 is not hot: {loads}"
        if case["case"] == "empty" and case["placement"] == "llep" and world > 1:
            # a rank without tokens of its own still helps: it receives rows and a copy of a foreign expert
            ex = [rank_cases[i]["exchange"][0] for rank_cases in by_rank]
            assert any(e["sent"] == 0 and e["received"] > 0 and e["copies"] for e in ex), ex
        assert all(rank_cases[i]["used"] == case["used"] for rank_cases in by_rank)
        limit, foreign = case["options"].get("max_tokens_per_device"), case["options"].get("max_foreign_experts")
        if limit is not None:  # no rank computes more rows, or hosts more copies, than the plan's limits allow
            assert max(received) <= limit and max(copies) <= foreign, (name, received, copies)
            assert loads.reshape(world, -1).sum(axis=1).max() > limit  # plain EP would break the limit


@pytest.mark.parametrize("world", [1, 2, 4])
def test_outputs_and_gradients_equal_single_process(world, tmp_path):
    results, codes, log = _launch("equivalence", world, tmp_path)
    assert codes == [0] * world, log
    _check_equivalence(results, world)
    assert sum("max_tokens_per_device" in c["options"] for c in results[0]["cases"]) == (world > 1)
    if world == 2:
        milp = [c for c in results[0]["cases"] if c["placement"] == "milp"][0]
        assert milp["used"] in ("milp", "llep")
        timed_out = [c for c in results[0]["cases"] if c["placement"] == "llep+"][-1]
        assert timed_out["used"] == "llep", timed_out["used"]
        _check_balancers(results)


def _check_balancers(results: list[dict]) -> None:
    """Two training steps with each balancer, the capacity and a sigmoid router: equal outputs, gradients,
    aux loss (the ranks' shares add up to it) and bias after every step."""
    for i, case in enumerate(results[0]["balancers"]):
        for r in results:
            bad = {k: v for k, v in r["balancers"][i]["errors"].items() if v > TOL}
            assert not bad, f"balancer case {i} ({case['placement']}): {bad}"
            assert r["balancers"][i]["ep_dropped"] == r["balancers"][i]["ref_dropped"]
    # the bias really moved in the loss_free and bip cases (else the bias check would be vacuous)
    for case in results[0]["balancers"][:2]:
        assert max(map(abs, case["bias"][-1])) > 0, case["bias"]
    # capacity 1.0 under 95% skew drops pairs, so the global drop order was exercised
    assert results[0]["balancers"][3]["dropped"] > 0


@pytest.mark.parametrize("mode", ["fault_stuck", "fault_exit"])
def test_a_failing_rank_never_hangs_the_others(mode, tmp_path):
    results, codes, log = _launch(mode, 2, tmp_path, limit=60, stop_others=mode == "fault_stuck")
    r0, r1 = results
    nope, bogus, alpha, odd = r0["bad_options"]
    assert "nope" in nope and "valid methods" in nope
    assert "bogus" in bogus and "alpha" in alpha
    assert "divisible" in odd
    # bad input on rank 1: its own ValueError there, a clear error on rank 0 at once (not after the timeout)
    assert r1["bad_input"].startswith("ValueError") and "hidden" in r1["bad_input"]
    assert r0["bad_input"].startswith("ExpertParallelError") and "rank(s) [1] failed" in r0["bad_input"]
    # ("rank(s) [1] failed" comes from the header that rank 1 sent: a timeout would say the peer never answered)
    assert r0["recovered"] and r1["recovered"]
    for r in (r0, r1):  # numpy, 0-d, int, bool, complex inputs: a ValueError naming `x` on every rank
        assert set(r["refused_inputs"]) == {"numpy", "0-d", "int", "bool", "complex"}
        for name, msg in r["refused_inputs"].items():
            assert msg.startswith("ValueError") and "`x`" in msg, (name, msg)
    # rank 1 raised outside the layer: rank 0 fails with a clear error, bounded by the group's 3 s timeout (a
    # hang would stop _launch at 60 s; how long the timeout took on this machine is not asserted)
    assert codes[1] != 0 and "injected failure on rank 1" in log
    assert r0["fault"].startswith("ExpertParallelError") and "rank 0/2" in r0["fault"], r0["fault"]


def test_exchange_counts_match_the_plan_and_keep_pairs_local():
    """The pure split computation against a brute-force matching: every pair of every rank goes to exactly one
    device, each device gets the plan's share of each expert, and a rank keeps as many of its own pairs as the
    plan lets it (the most any matching can)."""
    from moebalance.integrations.distributed import exchange_counts

    from moebalance import PlacementProblem, solve

    rng = np.random.default_rng(0)
    for P, E, method in ((1, 4, "llep"), (2, 4, "llep"), (4, 8, "llep"), (3, 6, "eplb"), (4, 8, "ep")):
        counts = rng.integers(0, 30, size=(P, E))
        counts[0, 0] += 200  # a hot expert
        if P > 1:
            counts[P - 1] = 0  # an empty rank
        problem = PlacementProblem(counts.sum(0), P, min_chunk=3, imbalance_threshold=None)
        x = np.asarray(solve(problem, method).assignment)
        sends = np.stack([exchange_counts(counts, x, r)[0] for r in range(P)])  # [src, dst, E]
        recvs = np.stack([exchange_counts(counts, x, r)[1] for r in range(P)])  # [dst, src, E]
        assert sends.min() >= 0
        assert np.array_equal(sends.sum(axis=1), counts)  # each rank sends all its pairs
        assert np.array_equal(sends.sum(axis=0).T, x)  # each device gets the plan's share of each expert
        assert np.array_equal(recvs, sends.transpose(1, 0, 2))  # what s sends to d is what d receives from s
        kept = sends[np.arange(P), np.arange(P)]  # [P, E] pairs computed where they were routed
        assert np.array_equal(kept, np.minimum(counts, x.T))
        if P == 2:  # brute force: every 2x2 matching of an expert's pairs (rows: counts, columns: the plan)
            for e in range(E):
                c0, c1, q0 = counts[0, e], counts[1, e], x[e, 0]
                best = max(
                    a + (c1 - (q0 - a)) for a in range(min(c0, q0) + 1) if 0 <= q0 - a <= c1 and c0 - a <= x[e, 1]
                )
                assert kept[:, e].sum() == best


def test_needs_an_initialized_group():
    from moebalance.integrations.distributed import ExpertParallelMoE
    from moebalance.integrations.torch import MoEConfig

    with pytest.raises(ValueError, match="not initialized"):
        ExpertParallelMoE(MoEConfig(hidden=4, ffn=4, num_experts=2, top_k=1))


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]))
