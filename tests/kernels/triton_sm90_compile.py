"""Compile every Triton kernel of moebalance.kernels for sm_90 (H100/H200) down to a cubin, without a GPU.

Run as a script in a process without TRITON_INTERPRET (tests/kernels/test_kernels.py does): the interpreter
accepts code that the real compiler rejects, so this is the CPU-side check of the GPU path.

    python tests/kernels/triton_sm90_compile.py        # prints one line per kernel; exit status 1 on a failure
"""

from __future__ import annotations

import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from moebalance.kernels import _triton_moe as K  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BF16, F32, I32, I64 = "*bf16", "*fp32", "*i32", "*i64"
# pointer arguments that are not bf16 activations/weights; every other *_ptr is bf16 and every scalar is i32
POINTERS = {
    "idx_ptr": I32,
    "block_expert_ptr": I32,
    "block_start_ptr": I32,
    "offsets_ptr": I32,
    "eidx_ptr": I64,
    "counts_ptr": I32,
    "totals_ptr": I32,
    "prefix_ptr": I32,
    "sorted_ptr": I32,
    "w_ptr": F32,
    "s_ptr": F32,
    "dw_ptr": F32,
}


def _compile(fn, consts: dict, opts: dict) -> str:
    sig = {
        n: "constexpr" if n in consts else POINTERS.get(n, BF16 if n.endswith("_ptr") else "i32") for n in fn.arg_names
    }
    c = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)
    assert c.asm.get("cubin"), "no cubin: ptxas did not run"
    return c.asm["ptx"]


def kernels() -> list[tuple[str, object, dict, dict]]:
    bm = 64
    out = []
    for kind, fn, extra in (
        ("gate_up", K._gate_up_kernel, {"TOP_K": 4, "SAVE": True}),
        ("down", K._down_kernel, {}),
        ("down_bwd", K._down_bwd_kernel, {"TOP_K": 4, "HAS_W": True}),
        ("dx", K._dx_kernel, {}),
    ):
        bn, bk, opts = K._blocks(kind, 4096, 4096, None)
        out.append((kind, fn, {**extra, "PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, opts))
    dw = {"TOP_K": 4, "PRECISION": "tf32", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}
    for a_g, b_g, scale in ((False, True, True), (True, False, False)):
        out.append(
            (
                "dw",
                K._dw_kernel,
                {**dw, "A_GATHER": a_g, "B_GATHER": b_g, "B_SCALE": scale},
                {"num_warps": 8, "num_stages": 3},
            )
        )
    out.append(("combine", K._combine_kernel, {"TOP_K": 4, "HAS_W": True, "BLOCK_T": 4, "BLOCK_N": 256}, {}))
    out.append(("combine_bwd", K._combine_bwd_kernel, {"TOP_K": 4, "BLOCK_P": 16, "BLOCK_N": 256}, {}))
    pad = triton.next_power_of_2(257)  # E = 256
    out.append(("route_count", K._route_count_kernel, {"BLOCK_P": 16, "NBINS_PAD": pad}, {}))
    out.append(("route_scan", K._route_scan_kernel, {"NBINS_PAD": pad, "BLOCK_NB": 128, "BLOCK_BINS": 32}, {}))
    out.append(("route_table", K._route_table_kernel, {"BLOCK_M": bm, "NBINS_PAD": pad, "BLOCK_B": 16}, {}))
    out.append(("route_scatter", K._route_scatter_kernel, {"BLOCK_P": 16, "NBINS_PAD": pad}, {}))
    return out


def main() -> int:
    failed = 0
    for name, fn, consts, opts in kernels():
        try:
            ptx = _compile(fn, consts, opts)
            print(f"{name:14s} ok ({len(ptx.splitlines())} PTX lines)", flush=True)
        except Exception as e:  # report every kernel, then fail
            failed += 1
            print(f"{name:14s} FAILED: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
