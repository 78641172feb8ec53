"""Balancer training study: a small byte-level MoE language model trained on CPU on the
Python standard library's sources, once per balancer (none, aux_loss 0.01 / 0.1, loss_free u=1e-3, bip,
bip_same_batch), for 16 and 64 experts with top-2 and top-8.

    python benchmarks/balancer_study.py            # the full study (measured: 886 s wall, 772 s CPU, on 2 busy cores)
    python benchmarks/balancer_study.py --quick    # smoke run (seconds)
    python benchmarks/balancer_study.py --steps 1000 --d-model 128 --layers 4   # larger

Prints the table and the comparison with arXiv 2408.15664 and arXiv 2502.15451, and writes
benchmarks/results/balancer_study.{json,md} and balancer_study_{maxvio,loss}.png (``_quick`` names for --quick).
The same study runs as ``moebalance study``; the code is moebalance/evaluation/study.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moebalance.evaluation.study import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(default_out=str(RESULTS)))
