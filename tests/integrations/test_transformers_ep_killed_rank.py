"""A rank that dies in the middle of an asynchronous weight move of a transformers model's replicated experts.

Two gloo ranks train a tiny Mixtral with ``ExpertParallel(replication="eplb", async_moves=True)``; at the
rebalance rank 1 exits while posting its part of the move. Rank 0 must raise
:class:`~moebalance.integrations.ep.ExpertParallelError` (naming the rank and the operation) within the process
group's timeout, not hang, and keep every layer's expert weights and layout as they were (no half-moved slots).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from tests.integrations.test_transformers import build, skew  # noqa: E402
from tests.integrations.test_transformers_ep_replicas import SEQS_PER_RANK, _batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 4.0  # the process group's timeout
LIMIT_S = 30.0  # far above the timeout: a hang, not a slow machine, exceeds it


def _worker(rank: int, world: int, out: str) -> None:
    import datetime

    import torch.distributed as dist
    from moebalance.integrations import ep
    from moebalance.integrations import transformers as mbt

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    rows = slice(rank * SEQS_PER_RANK, (rank + 1) * SEQS_PER_RANK)
    model = build("mixtral")
    skew(model)
    cfg = ep.ExpertParallel(
        num_local_slots=8 // world + 1, replication="eplb", step_interval=1, min_gain=0.0, async_moves=True
    )
    mbt.enable(model, expert_parallel=cfg)
    blocks = mbt._state(model).blocks
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(_batch(world)[rows]).logits.sum().backward()
    mbt.allreduce_grads(model)
    opt.step()
    if rank == 1:
        real = ep.comm.Communicator.p2p_start

        def dying(self, what, sends, recvs):
            if what.startswith("expert weight move"):  # posting the move: rank 0 waits on a dead peer
                print("rank 1 dies in the weight move", flush=True)
                os._exit(3)
            return real(self, what, sends, recvs)

        ep.comm.Communicator.p2p_start = dying
    names = blocks[0].shards.names
    before = {(i, n): getattr(b.experts, n).detach().clone() for i, b in enumerate(blocks) for n in names}
    layouts = [b.shards.replicas.layout.phy2log.copy() for b in blocks]
    res: dict = {"rank": rank, "error": "no error"}
    t0 = time.monotonic()
    try:
        reps = ep.maybe_rebalance(model, opt)  # posts the moves; the next forward waits for them
        res["posted"] = [bool(r.applied) for r in reps]
        with torch.no_grad():
            model(_batch(world, 1)[rows])
    except ep.ExpertParallelError as exc:
        res["error"] = f"ExpertParallelError: {exc}"
    except Exception as exc:  # any other error is a failure the test reports
        res["error"] = f"{type(exc).__name__}: {exc}"
    res["seconds"] = time.monotonic() - t0
    res["weights_unchanged"] = all(
        torch.equal(getattr(blocks[i].experts, n).detach(), w) for (i, n), w in before.items()
    )
    res["layouts_unchanged"] = all(
        np.array_equal(b.shards.replicas.layout.phy2log, lay) for b, lay in zip(blocks, layouts)
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    os._exit(0)  # no destroy_process_group: its peer is gone


def test_a_rank_killed_mid_move_on_a_transformers_model_gives_a_clear_error_in_time(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    module = "tests.integrations.test_transformers_ep_killed_rank"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(r), "2", str(tmp_path)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    log = "\n".join(logs)
    assert procs[1].returncode == 3 and "dies in the weight move" in log, log[-4000:]
    assert procs[0].returncode == 0, log[-4000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert r0["error"].startswith("ExpertParallelError") and "rank 0/2" in r0["error"], r0
    assert r0["posted"] == [True, True], r0  # both layers' moves were posted: the failure met the asynchronous wait
    assert "weight move" in r0["error"], r0  # the error names the move, not a later collective
    assert r0["seconds"] < LIMIT_S, r0
    assert r0["weights_unchanged"] and r0["layouts_unchanged"], r0


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
