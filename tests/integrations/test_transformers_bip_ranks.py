"""balancer="bip" under expert parallelism: the price of each batch is fitted on the global batch (every
rank's tokens) before its top-k, and is identical on every rank (2 gloo ranks on CPU, torch.multiprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.test_transformers import build, skew, tokens  # noqa: E402

WORLD = 2
SEQS = 2
ARCHS_EP = ("mixtral", "deepseek_v3")
STEPS = 2


def _batch(step: int) -> torch.Tensor:
    return tokens(SEQS * WORLD, 12, seed=20 + step)


def _worker(rank: int, out: str) -> None:
    import torch.distributed as dist
    from moebalance.integrations import transformers as mbt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    res = {}
    for arch in ARCHS_EP:
        model = build(arch)
        skew(model)
        mbt.enable(model, balancer="bip", expert_parallel=True)
        model.train()
        for step in range(STEPS):
            ids = _batch(step)[rank * SEQS : (rank + 1) * SEQS]
            model(ids)
            for i, q in enumerate(mbt.biases(model)):
                res[f"{arch}/{step}/{i}"] = q.numpy()
    np.savez(f"{out}/rank{rank}.npz", **res)
    dist.destroy_process_group()


def test_bip_prices_are_global_and_identical_on_every_rank(tmp_path):
    import torch.multiprocessing as mp
    from moebalance.integrations import transformers as mbt

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(WORLD)]
    assert set(ranks[0]) == set(ranks[1]) and len(ranks[0]) == len(ARCHS_EP) * STEPS * 2
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)  # bit for bit
    # one process on the rank-major concatenation fits the same prices (the global batch, not a rank's)
    for arch in ARCHS_EP:
        model = build(arch)
        skew(model)
        mbt.enable(model, balancer="bip")
        model.train()
        moved = False
        for step in range(STEPS):
            model(_batch(step))
            for i, q in enumerate(mbt.biases(model)):
                np.testing.assert_allclose(
                    ranks[0][f"{arch}/{step}/{i}"],
                    q.numpy(),
                    rtol=0,
                    atol=2e-6,
                    err_msg=f"{arch} step {step} layer {i}",
                )
                moved |= bool(np.abs(q.numpy()).max() > 1e-4)
        assert moved  # the skewed router needs a price: the comparison is not between zeros
