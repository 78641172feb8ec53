"""Gradient checkpointing of a transformers model with replicated experts and live rebalancing, over 2 gloo ranks.

``model.gradient_checkpointing_enable()`` re-runs each decoder layer's forward inside backward. That recompute
must not count as a step for ``step_interval`` nor add its loads to the rebalancing window a second time. One
launch of 2 ranks trains the same model with and without checkpointing (a rebalance in the middle, the weight
move asynchronous); the test compares the two runs on each rank: every step's logits, the final weights and
momentum, the step counters, the window (one row per training step, the same rows) and the rebalances.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.test_transformers import build, skew  # noqa: E402
from tests.integrations.test_transformers_ep_replicas import SEQS_PER_RANK, _batch, _close, _launch, _proj  # noqa: E402

STEPS, INTERVAL, WINDOW = 5, 3, 16  # the window is longer than the run: it holds every recorded row


def _train(world: int, rank: int, checkpointing: bool) -> dict[str, np.ndarray]:
    from moebalance.integrations import ep
    from moebalance.integrations import transformers as mbt

    rows = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
    model = build("mixtral")
    skew(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    cfg = ep.ExpertParallel(
        num_local_slots=8 // world + 1,
        replication="eplb",
        window_size=WINDOW,
        step_interval=INTERVAL,
        min_gain=0.0,
        async_moves=True,
    )
    mbt.enable(model, expert_parallel=cfg)
    blocks = mbt._state(model).blocks
    calls = [0]

    def count(*_):
        calls[0] += 1

    hooks = [b.experts.register_forward_pre_hook(count) for b in blocks]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    res: dict[str, np.ndarray] = {}
    for step in range(STEPS):
        opt.zero_grad()
        logits = model(_batch(world, step)[rows]).logits
        (logits * _proj(_batch(world, step).shape + (logits.shape[-1],), step)[rows]).sum().backward()
        mbt.allreduce_grads(model)
        opt.step()
        res[f"{step}/logits"] = logits.detach().numpy()
        res[f"{step}/counter"] = np.array([b.shards.step for b in blocks])
        reps = ep.maybe_rebalance(model, opt)
        res[f"{step}/rebalanced"] = np.array([r.applied for r in reps], dtype=bool)
        res[f"{step}/report_steps"] = np.array([r.step for r in reps], dtype=np.int64)
    for h in hooks:
        h.remove()
    res["expert_calls"] = np.array(calls[0])
    for i, b in enumerate(blocks):
        res[f"window/{i}"] = np.stack(list(b.shards.replicas.rebalancer.window))
    model.eval()
    with torch.no_grad():
        model(_batch(world, STEPS)[rows])  # completes a move in flight before the weights are read
    for n, p in model.named_parameters():
        res[f"final/{n}"] = p.detach().numpy()
        st = opt.state.get(p, {}).get("momentum_buffer")
        if st is not None:
            res[f"momentum/{n}"] = st.numpy()
    res["local"] = np.stack([b.shards.local_experts for b in blocks])
    res["layers"] = np.array(len(blocks))
    return res


def _worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    res = {}
    for name, ckpt in (("plain", False), ("ckpt", True)):
        res.update({f"{name}/{k}": v for k, v in _train(world, rank, ckpt).items()})
    np.savez(f"{out}/rank{rank}.npz", **res)
    dist.destroy_process_group()


def test_checkpointed_training_counts_each_step_once_and_equals_the_plain_run(tmp_path):
    results = _launch(2, tmp_path, module="tests.integrations.test_transformers_ep_checkpointing")
    for r, res in enumerate(results):
        layers = int(res["plain/layers"])
        # not vacuous: the checkpointed run re-ran every block's experts once more per step (the recompute)
        assert int(res["plain/expert_calls"]) == STEPS * layers
        assert int(res["ckpt/expert_calls"]) >= 2 * STEPS * layers, int(res["ckpt/expert_calls"])
        for s in range(STEPS):
            np.testing.assert_array_equal(res[f"ckpt/{s}/counter"], np.full(layers, s + 1))
            np.testing.assert_array_equal(res[f"plain/{s}/counter"], np.full(layers, s + 1))
            # the rebalances happen after the same steps, each reporting the training step it ran at
            for what in ("rebalanced", "report_steps"):
                np.testing.assert_array_equal(res[f"ckpt/{s}/{what}"], res[f"plain/{s}/{what}"], f"{what} {s}")
            _close(res[f"ckpt/{s}/logits"], res[f"plain/{s}/logits"], f"rank {r} step {s} logits", rel=1e-5)
        assert res[f"plain/{INTERVAL - 1}/rebalanced"].all(), "no rebalance after step INTERVAL (vacuous)"
        np.testing.assert_array_equal(res[f"plain/{INTERVAL - 1}/report_steps"], np.full(layers, INTERVAL))
        for i in range(layers):
            w = res[f"ckpt/window/{i}"]
            assert w.shape[0] == STEPS, f"layer {i}: {w.shape[0]} window rows for {STEPS} steps"
            np.testing.assert_array_equal(w, res[f"plain/window/{i}"])
            # each row is one training step's global kept loads: T tokens of every rank, top-2 each
            np.testing.assert_array_equal(w.sum(axis=1), np.full(w.shape[0], 2 * _batch(2).numel()))
        np.testing.assert_array_equal(res["ckpt/local"], res["plain/local"])
        for k in res:
            if k.startswith(("plain/final/", "plain/momentum/")):
                _close(res["ckpt/" + k[6:]], res[k], f"rank {r} {k[6:]}", rel=1e-5)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
