"""Expert parallelism of transformers models over gloo ranks equals one process (forward and backward).

Two launches in all (2 and 3 ranks); each rank runs every architecture with "ep" and "llep" and writes its
logits, gradients and plans to an ``.npz``; the test compares them with the single-process model here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.ranks import assert_close, launch_ranks  # noqa: E402
from tests.integrations.test_transformers import ARCHS, build, run, skew, tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PLACEMENTS = ("ep", "llep")
EXTRA = {"mixtral": ("milp",)}  # a method solved on rank 0 and broadcast
SEQS_PER_RANK = 2
# LLEP spills as soon as a device is over the mean (alpha=1), in chunks of any size
LLEP_OPTIONS = {"min_chunk": 1, "imbalance_threshold": None}


def _global_batch(world: int) -> torch.Tensor:
    return tokens(SEQS_PER_RANK * world, 10, seed=7)


def _worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist
    from moebalance.integrations import transformers as mbt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    ids = _global_batch(world)[rank * SEQS_PER_RANK : (rank + 1) * SEQS_PER_RANK]
    res: dict[str, np.ndarray] = {}
    for arch in ARCHS:
        for placement in PLACEMENTS + EXTRA.get(arch, ()):
            model = build(arch)
            skew(model)
            opts = LLEP_OPTIONS if placement != "ep" else {}
            mbt.enable(model, expert_parallel=True, placement=placement, **opts)
            logits = model(ids).logits
            r = torch.randn(
                _global_batch(world).shape + (logits.shape[-1],), generator=torch.Generator().manual_seed(3)
            )
            (logits * r[rank * SEQS_PER_RANK : (rank + 1) * SEQS_PER_RANK]).sum().backward()
            mbt.allreduce_grads(model)
            key = f"{arch}/{placement}"
            res[f"{key}/logits"] = logits.detach().numpy()
            for n, p in model.named_parameters():
                res[f"{key}/grad/{n}"] = p.grad.numpy()
            blocks = mbt._state(model).blocks
            res[f"{key}/home"] = np.array([blocks[0].shards.lo, blocks[0].shards.hi])
            res[f"{key}/replicated"] = np.array(blocks[0].shards.replicated_plan)
            res[f"{key}/used"] = np.array([b.shards.last_plan.used for b in blocks])
            res[f"{key}/transfers"] = np.array([len(b.shards.last_plan.weight_transfers) for b in blocks])
            res[f"{key}/loads"] = np.stack([s.loads for s in mbt.load_stats(model)])
            mbt.disable(model)  # gathers the shards back
            res[f"{key}/after_disable"] = model(ids).logits.detach().numpy()
    # balancers under expert parallelism step from the global loads / scores: the price matches one process
    for arch, balancer in (("deepseek_v3", "loss_free"), ("qwen3_moe", "bip")):
        model = build(arch)
        skew(model)
        mbt.enable(
            model, balancer=balancer, bias_update_rate=0.01, expert_parallel=True, placement="llep", **LLEP_OPTIONS
        )
        model.train()
        for _ in range(2):
            model(ids)
        res[f"{arch}/{balancer}/bias"] = np.stack([b.numpy() for b in mbt.biases(model)])
    # aux_loss: each rank's share (global f, its own probabilities over the global token count)
    model = build("olmoe")
    skew(model)
    mbt.enable(model, balancer="aux_loss", expert_parallel=True)
    model.train()
    model(ids)
    res["olmoe/aux_loss"] = np.array(float(mbt.aux_loss(model).detach()))
    res["olmoe/aux_loss_stats"] = np.array([s.aux_loss for s in mbt.load_stats(model)])
    np.savez(f"{out}/rank{rank}.npz", **res)
    dist.destroy_process_group()


def _launch(world: int, tmp: Path) -> list[dict[str, np.ndarray]]:
    return launch_ranks("tests.integrations.test_transformers_ep", world, tmp, timeout=300)


def _close(a: np.ndarray, b: np.ndarray, what: str, rel: float = 1e-5) -> None:
    assert_close(a, b, what, rel)


@pytest.fixture(scope="module")
def references():
    """Single-process logits and gradients on the global batch, per architecture and world size."""
    from moebalance.integrations import transformers as mbt

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for world in (2, 3):
        ids = _global_batch(world)
        for arch in ARCHS:
            model = build(arch)
            skew(model)
            out[world, arch] = run(model, ids)
        for arch, balancer in (("deepseek_v3", "loss_free"), ("qwen3_moe", "bip")):
            model = build(arch)
            skew(model)
            mbt.enable(model, balancer=balancer, bias_update_rate=0.01)
            model.train()
            for _ in range(2):
                model(ids)
            out[world, arch, balancer] = np.stack([b.numpy() for b in mbt.biases(model)])
        model = build("olmoe")
        skew(model)
        mbt.enable(model, balancer="aux_loss")
        model.train()
        model(ids)
        out[world, "aux"] = (float(mbt.aux_loss(model).detach()), [s.aux_loss for s in mbt.load_stats(model)])
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_expert_parallel_equals_one_process(world, references, tmp_path):
    results = _launch(world, tmp_path)
    spilled = 0
    for arch in ARCHS:
        ref_logits, ref_grads = references[world, arch]
        for placement in PLACEMENTS + EXTRA.get(arch, ()):
            key = f"{arch}/{placement}"
            for r, res in enumerate(results):
                rows = slice(r * SEQS_PER_RANK, (r + 1) * SEQS_PER_RANK)
                _close(res[f"{key}/logits"], ref_logits[rows].numpy(), f"{key} rank {r} logits")
                _close(res[f"{key}/after_disable"], ref_logits[rows].numpy(), f"{key} rank {r} after disable")
                lo, hi = res[f"{key}/home"]
                for n, g in ref_grads.items():
                    got = res[f"{key}/grad/{n}"]
                    want = g.numpy()
                    if ".experts." in n:  # this rank's home experts
                        want = want[lo:hi]
                    _close(got, want, f"{key} rank {r} grad {n}", rel=2e-5)
                # the loads are global: identical on every rank, T*k pairs per layer
                np.testing.assert_array_equal(res[f"{key}/loads"], results[0][f"{key}/loads"])
                assert (res[f"{key}/loads"].sum(1) == ref_logits.shape[0] * ref_logits.shape[1] * 2).all()
            homes = sorted(tuple(res[f"{key}/home"]) for res in results)
            assert homes[0][0] == 0 and homes[-1][1] == 8 and all(a[1] == b[0] for a, b in zip(homes, homes[1:]))
            transfers = results[0][f"{key}/transfers"]
            if placement == "ep":
                assert (transfers == 0).all()
            # ep/llep plan on every rank; milp on rank 0, broadcast; no fallback happened
            assert bool(results[0][f"{key}/replicated"]) == (placement != "milp")
            assert (results[0][f"{key}/used"] == placement).all()
            spilled += int(transfers.sum())
    assert spilled > 0  # LLEP did copy experts under the skewed routers: the copies' path was exercised
    for arch, balancer in (("deepseek_v3", "loss_free"), ("qwen3_moe", "bip")):
        for res in results:
            np.testing.assert_allclose(
                res[f"{arch}/{balancer}/bias"], references[world, arch, balancer], rtol=1e-6, atol=1e-7
            )
    total, per_layer = references[world, "aux"]
    assert sum(float(res["olmoe/aux_loss"]) for res in results) == pytest.approx(total, rel=1e-5)
    for res in results:  # the stats hold the global loss on every rank
        np.testing.assert_allclose(res["olmoe/aux_loss_stats"], per_layer, rtol=1e-5)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
