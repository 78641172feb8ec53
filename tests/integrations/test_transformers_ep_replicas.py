"""Replicated experts and live rebalancing of transformers models over gloo ranks equal one process.

``enable(model, expert_parallel=ExpertParallel(...))`` runs the runtime's :class:`ReplicatedExperts` (the object
ExpertParallelMoE uses). One launch per world size (2 and 4 ranks); each rank writes an ``.npz`` and the test
compares it with the single-process model computed here: logits and every gradient for each split over the
replicas (even, the dispatch LP, LLEP over the slots) on a SwiGLU model (Mixtral) and gpt-oss's biased GLU; and a
training run (SGD with momentum) with a rebalance in the middle, every step's logits and the weights after it
equal to the single-process run, the weight move asynchronous (posted at the rebalance, completed by the next
forward).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.ranks import assert_close, launch_ranks  # noqa: E402
from tests.integrations.test_transformers import build, skew, tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SEQS_PER_RANK = 2
SPLITS = {
    "even": {},
    "lp": {},
    "llep": {"min_chunk": 1, "imbalance_threshold": None},  # spills as soon as a rank is over the mean
}
ARCHS = ("mixtral", "gpt_oss")
TRAIN_STEPS, INTERVAL = 6, 3


def _batch(world: int, step: int = 0) -> torch.Tensor:
    return tokens(SEQS_PER_RANK * world, 10, seed=7 + step)


def _proj(shape, step: int = 0) -> torch.Tensor:
    """A fixed random projection of the logits, small enough that SGD steps stay small (a tame run: float
    reordering does not grow into different weights)."""
    return 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(3 + step))


def _worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from moebalance.integrations import ep
    from moebalance.integrations import transformers as mbt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    rows = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
    ids = _batch(world)[rows]
    res: dict[str, np.ndarray] = {}
    slots = 8 // world + 1
    for arch in ARCHS:
        for split, opts in SPLITS.items():
            model = build(arch)
            skew(model)
            cfg = ep.ExpertParallel(num_local_slots=slots, split=split, split_options=opts or None)
            mbt.enable(model, expert_parallel=cfg)
            logits = model(ids).logits
            (logits * _proj(_batch(world).shape + (logits.shape[-1],))[rows]).sum().backward()
            mbt.allreduce_grads(model)
            key = f"{arch}/{split}"
            res[f"{key}/logits"] = logits.detach().numpy()
            for n, p in model.named_parameters():
                res[f"{key}/grad/{n}"] = p.grad.numpy()
            blocks = mbt._state(model).blocks
            res[f"{key}/local"] = np.stack([b.shards.local_experts for b in blocks])
            res[f"{key}/assignment"] = np.stack([b.shards.last_plan.assignment for b in blocks])
            res[f"{key}/transfers"] = np.array([len(b.shards.last_plan.weight_transfers) for b in blocks])
            mbt.disable(model)
            res[f"{key}/after_disable"] = model(ids).logits.detach().numpy()
    # training with a rebalance after step INTERVAL: weights and momentum move; every step equals one process
    model = build("mixtral")
    skew(model)
    cfg = ep.ExpertParallel(
        num_local_slots=slots,
        replication="eplb",
        window_size=INTERVAL,
        step_interval=INTERVAL,
        min_gain=0.0,
        async_moves=True,  # gloo's default waits inside the rebalance; here the next forward completes the move
    )
    mbt.enable(model, expert_parallel=cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    blocks = mbt._state(model).blocks
    res["train/local0"] = np.stack([b.shards.local_experts for b in blocks])
    for step in range(TRAIN_STEPS):
        opt.zero_grad()
        logits = model(_batch(world, step)[rows]).logits
        (logits * _proj(_batch(world, step).shape + (logits.shape[-1],), step)[rows]).sum().backward()
        mbt.allreduce_grads(model)
        opt.step()
        res[f"train/{step}/logits"] = logits.detach().numpy()
        reps = ep.maybe_rebalance(model, opt)
        res[f"train/{step}/rebalanced"] = np.array([r.applied for r in reps], dtype=bool)
        res[f"train/{step}/moves"] = np.array([r.moves for r in reps], dtype=np.int64)
        res[f"train/{step}/bytes"] = np.array([r.bytes_moved for r in reps], dtype=np.int64)
        res[f"train/{step}/pending"] = np.array([b.shards.replicas.pending is not None for b in blocks])
    model(_batch(world, TRAIN_STEPS)[rows])  # completes the last move (if any) before the weights are read
    for b in blocks:
        b.shards.replicas.wait()
    for n, p in model.named_parameters():
        res[f"train/final/{n}"] = p.detach().numpy()
        st = opt.state.get(p, {}).get("momentum_buffer")
        if st is not None:
            res[f"train/momentum/{n}"] = st.numpy()
    res["train/local"] = np.stack([b.shards.local_experts for b in blocks])
    np.savez(f"{out}/rank{rank}.npz", **res)
    dist.destroy_process_group()


def _launch(
    world: int, tmp: Path, module: str = "tests.integrations.test_transformers_ep_replicas"
) -> list[dict[str, np.ndarray]]:
    return launch_ranks(module, world, tmp, timeout=600)


def _close(a: np.ndarray, b: np.ndarray, what: str, rel: float = 2e-5) -> None:
    assert_close(a, b, what, rel)


def _expert_rows(name: str, full: np.ndarray, local: np.ndarray) -> np.ndarray:
    """A full ``[E, ...]`` expert tensor's rows for this rank's slots (``local [L, S]`` per MoE layer)."""
    layer = int(name.split(".layers.")[1].split(".")[0])
    return full[local[layer]]


def _reference(world: int):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for arch in ARCHS:
        model = build(arch)
        skew(model)
        model.zero_grad(set_to_none=True)
        logits = model(_batch(world)).logits
        (logits * _proj(logits.shape)).sum().backward()
        out[arch] = (logits.detach().numpy(), {k: p.grad.numpy().copy() for k, p in model.named_parameters()})
    model = build("mixtral")
    skew(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = []
    for step in range(TRAIN_STEPS):
        opt.zero_grad()
        logits = model(_batch(world, step)).logits
        (logits * _proj(logits.shape, step)).sum().backward()
        opt.step()
        steps.append(logits.detach().numpy())
    final = {k: p.detach().numpy().copy() for k, p in model.named_parameters()}
    momentum = {k: opt.state[p]["momentum_buffer"].numpy().copy() for k, p in model.named_parameters()}
    torch.set_num_threads(n)
    return out, steps, final, momentum


def test_enable_refuses_a_bad_expert_parallel_before_changing_the_model():
    from moebalance.integrations import transformers as mbt

    model = build("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad in ("yes", 1, {"num_local_slots": 5}):
        with pytest.raises(ValueError, match="expert_parallel"):
            mbt.enable(model, expert_parallel=bad)
    assert not mbt.is_enabled(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transformers_module_reexports_the_replicated_experts_api():
    from moebalance.integrations import ep
    from moebalance.integrations import transformers as mbt

    assert mbt.ExpertParallel is ep.ExpertParallel and mbt.maybe_rebalance is ep.maybe_rebalance
    assert {"ExpertParallel", "maybe_rebalance"} <= set(mbt.__all__)
    assert mbt.maybe_rebalance(build("mixtral")) == []  # a model without replicated layers: nothing to do


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_experts_and_rebalancing_equal_one_process(world, tmp_path):
    results = _launch(world, tmp_path)
    ref, ref_steps, ref_final, ref_momentum = _reference(world)
    for arch in ARCHS:
        ref_logits, ref_grads = ref[arch]
        for split in SPLITS:
            key = f"{arch}/{split}"
            for r, res in enumerate(results):
                rows = slice(r * SEQS_PER_RANK, (r + 1) * SEQS_PER_RANK)
                _close(res[f"{key}/logits"], ref_logits[rows], f"{key} rank {r} logits", rel=1e-5)
                _close(res[f"{key}/after_disable"], ref_logits[rows], f"{key} rank {r} after disable", rel=1e-5)
                for n, g in ref_grads.items():
                    want = _expert_rows(n, g, res[f"{key}/local"]) if ".experts." in n else g
                    _close(res[f"{key}/grad/{n}"], want, f"{key} rank {r} grad {n}")
                np.testing.assert_array_equal(res[f"{key}/assignment"], results[0][f"{key}/assignment"])
            x = results[0][f"{key}/assignment"]  # [L, E, P]
            assert ((x > 0).sum(axis=2) > 1).any(), f"{key}: no expert was split over replicas (vacuous)"
            if split == "llep":  # LLEP over the slots lent weights to a rank without a replica
                assert results[0][f"{key}/transfers"].sum() > 0, key
    # training with a rebalance in the middle
    r0 = results[0]
    applied = [bool(r0[f"train/{s}/rebalanced"].any()) for s in range(TRAIN_STEPS)]
    assert applied[INTERVAL - 1], applied  # the first rebalance happened after step INTERVAL
    assert sum(int(r0[f"train/{s}/moves"].sum()) for s in range(TRAIN_STEPS)) > 0
    assert sum(int(res[f"train/{INTERVAL - 1}/bytes"].sum()) for res in results) > 0
    assert r0[f"train/{INTERVAL - 1}/pending"].any(), "the weight move did not run asynchronously"
    for r, res in enumerate(results):
        rows = slice(r * SEQS_PER_RANK, (r + 1) * SEQS_PER_RANK)
        for s in range(TRAIN_STEPS):
            _close(res[f"train/{s}/logits"], ref_steps[s][rows], f"train step {s} rank {r} logits", rel=1e-4)
        for n, w in ref_final.items():
            want = _expert_rows(n, w, res["train/local"]) if ".experts." in n else w
            _close(res[f"train/final/{n}"], want, f"train rank {r} weight {n}", rel=1e-4)
            m = _expert_rows(n, ref_momentum[n], res["train/local"]) if ".experts." in n else ref_momentum[n]
            _close(res[f"train/momentum/{n}"], m, f"train rank {r} momentum {n}", rel=1e-4)
    # the rebalance changed which experts some rank holds
    assert any(not np.array_equal(res["train/local0"], res["train/local"]) for res in results)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
