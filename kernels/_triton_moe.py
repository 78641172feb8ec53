"""Triton kernels of the MoE layer and their launchers (shape checks, allocation, grid).

Imported only when the Triton path runs (``moebalance.kernels.ops`` imports it lazily), so importing
``moebalance.kernels`` needs neither triton nor a GPU. On CPU the kernels run only under the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before this module is first imported (``triton.jit`` reads it then).

Names used throughout (P = T * k token-expert pairs, pair id ``p = t * k + j``):
  - ``eidx`` ``[T, k]``: expert of each pair; a value outside ``[0, E)`` marks a dropped pair.
  - ``sorted_idx`` ``[P]`` int32: pair ids grouped by expert (ascending expert, token order inside an expert),
    dropped pairs last. "Sorted row" r means position r in this order.
  - ``offsets`` ``[E + 1]`` int32: expert e owns sorted rows ``offsets[e]:offsets[e + 1]``.
  - ``block_expert``/``block_start`` ``[max_blocks]`` int32: the GEMM row tiles. Each expert's rows are cut
    into ``ceil(count / BLOCK_M)`` tiles of BLOCK_M rows (the last one partial and masked, rows are never
    copied into a padded buffer); tile b covers sorted rows ``block_start[b] + [0, BLOCK_M)`` of expert
    ``block_expert[b]``; -1 marks the unused tail of the table (the grid is sized by an upper bound so the
    launch needs no host sync).

The combine back to token order is a deterministic second pass (no atomics): the down-projection GEMM writes
each pair's expert output to its own row ``o[p]`` and ``_combine_kernel`` sums the k rows of a token in a fixed
order. The same pass reduces the pair rows of dX in the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------------------
# kernels: routing metadata (histogram per pair block -> scan over blocks -> offsets/tiles -> scatter)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _route_count_kernel(eidx_ptr, counts_ptr, P, E, BLOCK_P: tl.constexpr, NBINS_PAD: tl.constexpr):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    e = tl.load(eidx_ptr + p, mask=pm, other=0).to(tl.int32)
    e = tl.where((e < 0) | (e >= E), E, e)  # bin E collects dropped pairs
    bins = tl.arange(0, NBINS_PAD)
    hit = ((e[:, None] == bins[None, :]) & pm[:, None]).to(tl.int32)
    tl.store(counts_ptr + pid * NBINS_PAD + bins, tl.sum(hit, axis=0))


@triton.jit
def _route_scan_kernel(
    counts_ptr, totals_ptr, NB, NBINS_PAD: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_BINS: tl.constexpr
):
    # in place: counts[b, bin] becomes the number of pairs of that bin in blocks before b
    bins = tl.program_id(0) * BLOCK_BINS + tl.arange(0, BLOCK_BINS)
    run = tl.zeros([BLOCK_BINS], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_NB):
        bs = b0 + tl.arange(0, BLOCK_NB)
        m = (bs < NB)[:, None]
        ptrs = counts_ptr + bs[:, None] * NBINS_PAD + bins[None, :]
        c = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(c, axis=0) - c + run[None, :], mask=m)
        run += tl.sum(c, axis=0)
    tl.store(totals_ptr + bins, run)


@triton.jit
def _route_table_kernel(
    totals_ptr,
    offsets_ptr,
    block_expert_ptr,
    block_start_ptr,
    E,
    NBINS,
    MAX_BLOCKS,
    BLOCK_M: tl.constexpr,
    NBINS_PAD: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    # every program recomputes the (tiny) prefix sums and fills its own chunk of the tile table
    bins = tl.arange(0, NBINS_PAD)
    c = tl.load(totals_ptr + bins, mask=bins < NBINS, other=0)
    exc = tl.cumsum(c, axis=0) - c
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(offsets_ptr + bins, exc, mask=bins < NBINS)
        tl.store(offsets_ptr + NBINS, tl.sum(c, axis=0))
    is_exp = bins < E
    nblk = tl.where(is_exp, (c + BLOCK_M - 1) // BLOCK_M, 0)
    binc = tl.cumsum(nblk, axis=0)
    row_base = exc - (binc - nblk) * BLOCK_M
    b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    # tile b belongs to the first expert whose inclusive tile count exceeds b (empty experts are skipped)
    e_of_b = tl.sum(((binc[None, :] <= b[:, None]) & is_exp[None, :]).to(tl.int32), axis=1)
    start = tl.sum(tl.where(bins[None, :] == e_of_b[:, None], row_base[None, :], 0), axis=1) + b * BLOCK_M
    valid = e_of_b < E
    bm = b < MAX_BLOCKS
    tl.store(block_expert_ptr + b, tl.where(valid, e_of_b, -1), mask=bm)
    tl.store(block_start_ptr + b, tl.where(valid, start, 0), mask=bm)


@triton.jit
def _route_scatter_kernel(
    eidx_ptr, prefix_ptr, offsets_ptr, sorted_ptr, P, E, NBINS, BLOCK_P: tl.constexpr, NBINS_PAD: tl.constexpr
):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    e = tl.load(eidx_ptr + p, mask=pm, other=0).to(tl.int32)
    e = tl.where((e < 0) | (e >= E), E, e)
    bins = tl.arange(0, NBINS_PAD)
    hit = ((e[:, None] == bins[None, :]) & pm[:, None]).to(tl.int32)
    rank = tl.sum((tl.cumsum(hit, axis=0) - hit) * hit, axis=1)  # earlier pairs of the same bin in this block
    base = tl.load(offsets_ptr + bins, mask=bins < NBINS, other=0) + tl.load(prefix_ptr + pid * NBINS_PAD + bins)
    pos = tl.sum(hit * base[None, :], axis=1) + rank
    tl.store(sorted_ptr + pos, p.to(tl.int32), mask=pm)


# ---------------------------------------------------------------------------------------------------------
# kernels: grouped GEMMs over the row tiles
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(block_expert_ptr, block_start_ptr, offsets_ptr, idx_ptr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert, sorted rows, row mask, pair ids and token ids of this program's row tile."""
    b = tl.program_id(0)
    e = tl.load(block_expert_ptr + b)
    row0 = tl.load(block_start_ptr + b)
    end = tl.where(e >= 0, tl.load(offsets_ptr + tl.maximum(e, 0) + 1), 0)  # unused tile: no row
    rows = row0 + tl.arange(0, BLOCK_M)
    rmask = rows < end
    pair = tl.load(idx_ptr + rows, mask=rmask, other=0).to(tl.int64)
    return e, rows.to(tl.int64), rmask, pair, pair // TOP_K


@triton.jit
def _gate_up_kernel(
    x_ptr,
    idx_ptr,
    wg_ptr,
    wu_ptr,
    h_ptr,
    g_ptr,
    u_ptr,
    block_expert_ptr,
    block_start_ptr,
    offsets_ptr,
    N,
    K,
    stride_xm,
    stride_we,
    stride_wk,
    stride_wn,
    TOP_K: tl.constexpr,
    SAVE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """h[r] = silu(x[tok(r)] @ w_gate[e]) * (x[tok(r)] @ w_up[e]) for sorted rows r of expert e."""
    e, rows, rmask, pair, tok = _tile_rows(block_expert_ptr, block_start_ptr, offsets_ptr, idx_ptr, TOP_K, BLOCK_M)
    if e >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + ks[None, :]
        # 64-bit only in the expert's base address; the in-expert offsets fit in 32 bits (fewer registers)
        w_off = ks[:, None] * stride_wk + cols[None, :] * stride_wn
        wg_ptrs = wg_ptr + e.to(tl.int64) * stride_we + w_off
        wu_ptrs = wu_ptr + e.to(tl.int64) * stride_we + w_off
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = ks < K - k0
            a = tl.load(x_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            wm = km[:, None] & cmask[None, :]
            acc_g = tl.dot(a, tl.load(wg_ptrs, mask=wm, other=0.0), acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, tl.load(wu_ptrs, mask=wm, other=0.0), acc_u, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K * stride_wk
            wu_ptrs += BLOCK_K * stride_wk
        h = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU in the epilogue, in fp32
        out = rows[:, None] * N + cols[None, :]
        om = rmask[:, None] & cmask[None, :]
        tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=om)
        if SAVE:
            tl.store(g_ptr + out, acc_g.to(g_ptr.dtype.element_ty), mask=om)
            tl.store(u_ptr + out, acc_u.to(u_ptr.dtype.element_ty), mask=om)


@triton.jit
def _down_kernel(
    h_ptr,
    idx_ptr,
    wd_ptr,
    o_ptr,
    block_expert_ptr,
    block_start_ptr,
    offsets_ptr,
    N,
    K,
    stride_we,
    stride_wk,
    stride_wn,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """o[pair(r)] = h[r] @ w_down[e]: the output row of each pair lands at its pair id (token order)."""
    e, rows, rmask, pair, tok = _tile_rows(block_expert_ptr, block_start_ptr, offsets_ptr, idx_ptr, 1, BLOCK_M)
    if e >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = h_ptr + rows[:, None] * K + ks[None, :]
        w_ptrs = wd_ptr + e.to(tl.int64) * stride_we + (ks[:, None] * stride_wk + cols[None, :] * stride_wn)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = ks < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=km[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        tl.store(
            o_ptr + pair[:, None] * N + cols[None, :],
            acc.to(o_ptr.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )


@triton.jit
def _combine_kernel(
    o_ptr,
    w_ptr,
    eidx_ptr,
    y_ptr,
    T,
    N,
    E,
    TOP_K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y[t] = sum_j w[t, j] * o[t * k + j] over the kept pairs, in fixed order j = 0..k-1 (deterministic)."""
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    tm = t < T
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < N
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        p = t * TOP_K + j
        e = tl.load(eidx_ptr + p, mask=tm, other=-1)
        keep = tm & (e >= 0) & (e < E)
        v = tl.load(o_ptr + p[:, None] * N + cols[None, :], mask=keep[:, None] & cm[None, :], other=0.0)
        if HAS_W:
            v = v.to(tl.float32) * tl.load(w_ptr + p, mask=keep, other=0.0).to(tl.float32)[:, None]
        acc += v.to(tl.float32)
    tl.store(y_ptr + t[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=tm[:, None] & cm[None, :])


@triton.jit
def _combine_bwd_kernel(
    dy_ptr, o_ptr, eidx_ptr, dw_ptr, P, N, E, TOP_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr
):
    """dw[p] = <dy[t], o[p]> for kept pairs p = t * k + j, 0 for dropped ones."""
    p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    pm = p < P
    e = tl.load(eidx_ptr + p, mask=pm, other=-1)
    keep = pm & (e >= 0) & (e < E)
    t = p // TOP_K
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        m = keep[:, None] & (cols < N)[None, :]
        dy = tl.load(dy_ptr + t[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + p[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(dy * o, axis=1)
    tl.store(dw_ptr + p, acc, mask=pm)


@triton.jit
def _down_bwd_kernel(
    dy_ptr,
    w_ptr,
    idx_ptr,
    wd_ptr,
    g_ptr,
    u_ptr,
    dg_ptr,
    du_ptr,
    block_expert_ptr,
    block_start_ptr,
    offsets_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    stride_wk,
    TOP_K: tl.constexpr,
    HAS_W: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dh[r] = w[pair] * dy[tok] @ w_down[e]^T, then the SwiGLU backward in the epilogue: dg, du at sorted rows.

    N = ffn (output columns), K = hidden (reduction); w_down[e] is read transposed through its strides.
    """
    e, rows, rmask, pair, tok = _tile_rows(block_expert_ptr, block_start_ptr, offsets_ptr, idx_ptr, TOP_K, BLOCK_M)
    if e >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = dy_ptr + tok[:, None] * K + ks[None, :]
        w_ptrs = wd_ptr + e.to(tl.int64) * stride_we + (ks[:, None] * stride_wk + cols[None, :] * stride_wn)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = ks < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=km[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        if HAS_W:
            acc = acc * tl.load(w_ptr + pair, mask=rmask, other=0.0).to(tl.float32)[:, None]
        out = rows[:, None] * N + cols[None, :]
        om = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + out, mask=om, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + out, mask=om, other=0.0).to(tl.float32)
        sg = tl.sigmoid(g)
        tl.store(dg_ptr + out, (acc * u * sg * (1.0 + g * (1.0 - sg))).to(dg_ptr.dtype.element_ty), mask=om)
        tl.store(du_ptr + out, (acc * g * sg).to(du_ptr.dtype.element_ty), mask=om)


@triton.jit
def _dx_kernel(
    dg_ptr,
    du_ptr,
    idx_ptr,
    wg_ptr,
    wu_ptr,
    dx_ptr,
    block_expert_ptr,
    block_start_ptr,
    offsets_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    stride_wk,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx_pairs[pair(r)] = dg[r] @ w_gate[e]^T + du[r] @ w_up[e]^T (N = hidden, K = ffn)."""
    e, rows, rmask, pair, tok = _tile_rows(block_expert_ptr, block_start_ptr, offsets_ptr, idx_ptr, 1, BLOCK_M)
    if e >= 0:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_off = rows[:, None] * K + ks[None, :]
        dg_ptrs = dg_ptr + a_off
        du_ptrs = du_ptr + a_off
        w_off = ks[:, None] * stride_wk + cols[None, :] * stride_wn
        wg_ptrs = wg_ptr + e.to(tl.int64) * stride_we + w_off
        wu_ptrs = wu_ptr + e.to(tl.int64) * stride_we + w_off
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            km = ks < K - k0
            am = rmask[:, None] & km[None, :]
            wm = km[:, None] & cmask[None, :]
            acc = tl.dot(
                tl.load(dg_ptrs, mask=am, other=0.0),
                tl.load(wg_ptrs, mask=wm, other=0.0),
                acc,
                input_precision=PRECISION,
            )
            acc = tl.dot(
                tl.load(du_ptrs, mask=am, other=0.0),
                tl.load(wu_ptrs, mask=wm, other=0.0),
                acc,
                input_precision=PRECISION,
            )
            dg_ptrs += BLOCK_K
            du_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K * stride_wk
            wu_ptrs += BLOCK_K * stride_wk
        tl.store(
            dx_ptr + pair[:, None] * N + cols[None, :],
            acc.to(dx_ptr.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )


@triton.jit
def _dw_kernel(
    a_ptr,
    b_ptr,
    idx_ptr,
    s_ptr,
    out_ptr,
    offsets_ptr,
    M,
    N,
    TOP_K: tl.constexpr,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    B_SCALE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[e] = A[rows of e]^T @ (s * B[rows of e]), [M, N] per expert; a row is gathered by token when asked.

    Sorted row r maps to A row ``pair(r) // k`` when A_GATHER, else r (same for B); s = s[pair(r)] when B_SCALE.
    Experts without rows get zeros (the loop runs zero times).
    """
    e = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pm_ = tl.program_id(1) // tiles_n
    pn_ = tl.program_id(1) % tiles_n
    ms = pm_ * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pn_ * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = ms < M
    nm = ns < N
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        rm = rs < end
        pair = tl.load(idx_ptr + rs, mask=rm, other=0).to(tl.int64)
        if A_GATHER:
            ar = pair // TOP_K
        else:
            ar = rs.to(tl.int64)
        if B_GATHER:
            br = pair // TOP_K
        else:
            br = rs.to(tl.int64)
        a = tl.load(a_ptr + ar[None, :] * M + ms[:, None], mask=rm[None, :] & mm[:, None], other=0.0)
        b = tl.load(b_ptr + br[:, None] * N + ns[None, :], mask=rm[:, None] & nm[None, :], other=0.0)
        if B_SCALE:
            s = tl.load(s_ptr + pair, mask=rm, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * s[:, None]).to(a.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = e.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
    tl.store(out_ptr + out, acc.to(out_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------


# triton.jit chose interpreted or compiled kernels when this module was imported: what counts is that moment
_INTERPRETED = bool(triton.knobs.runtime.interpret)


def _interpret() -> bool:
    return _INTERPRETED


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _interpret():
            raise ValueError(
                f"the Triton kernels need CUDA tensors (got a tensor on {t.device}); on CPU use backend='torch', "
                "or set TRITON_INTERPRET=1 before moebalance's Triton kernels are first used (they were loaded "
                "without it)"
            )


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own TF32 switch, so the two paths agree on what "fp32" means
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# (BLOCK_N, BLOCK_K) per kernel for 16-bit inputs on the GPU with BLOCK_M = 64, 8 warps: the largest tiles that
# ptxas compiled for sm_90 without register spills (checked by compiling ahead of time; the speed of these
# choices is not measured yet)
_GPU_TILES = {"gate_up": (64, 64), "down": (128, 32), "down_bwd": (64, 64), "dx": (64, 32)}


def _blocks(kind: str, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, dict]:
    """BLOCK_N, BLOCK_K and launch options for GEMM ``kind`` with n output columns and reduction length k."""
    if _interpret():  # few, large programs: the interpreter's cost is per program
        return (max(16, min(64, triton.next_power_of_2(n))), max(16, min(64, triton.next_power_of_2(k))), {})
    if dtype == torch.float32:
        return 64, 32, {"num_warps": 8, "num_stages": 3}
    bn, bk = _GPU_TILES[kind]
    return bn, bk, {"num_warps": 8, "num_stages": 3}


def _contig(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def routing_metadata(eidx: torch.Tensor, num_experts: int, block_m: int):
    """Sort the ``[T, k]`` pairs by expert and cut them into row tiles; see the module docstring.

    Returns ``sorted_idx [P]``, ``offsets [E + 1]``, ``block_expert [max_blocks]``, ``block_start [max_blocks]``
    (int32), with ``max_blocks = ceil(P / block_m) + E``.
    """
    _check_device(eidx)
    eidx = eidx.contiguous()
    P, E = eidx.numel(), num_experts
    dev = eidx.device
    nbins = E + 1
    nbins_pad = triton.next_power_of_2(nbins)
    block_p = max(16, min(256, triton.next_power_of_2(max(1, 8192 // nbins_pad))))
    if _interpret():
        block_p = max(block_p, 64)
    nb = triton.cdiv(max(P, 1), block_p)
    prefix = torch.empty(nb, nbins_pad, dtype=torch.int32, device=dev)
    totals = torch.empty(nbins_pad, dtype=torch.int32, device=dev)
    offsets = torch.empty(nbins + 1, dtype=torch.int32, device=dev)
    sorted_idx = torch.empty(P, dtype=torch.int32, device=dev)
    _route_count_kernel[(nb,)](eidx, prefix, P, E, BLOCK_P=block_p, NBINS_PAD=nbins_pad)
    block_bins = min(nbins_pad, 32)  # more programs, fewer sequential steps: each walks nb / BLOCK_NB tiles
    _route_scan_kernel[(nbins_pad // block_bins,)](
        prefix, totals, nb, NBINS_PAD=nbins_pad, BLOCK_NB=128, BLOCK_BINS=block_bins
    )
    block_expert, block_start = _table(totals, offsets, E, nbins, P, block_m)
    if P:
        _route_scatter_kernel[(nb,)](
            eidx, prefix, offsets, sorted_idx, P, E, nbins, BLOCK_P=block_p, NBINS_PAD=nbins_pad
        )
    return sorted_idx, offsets[: E + 1], block_expert, block_start


def _table(totals, offsets, E, nbins, P, block_m):
    max_blocks = triton.cdiv(P, block_m) + E
    nbins_pad = triton.next_power_of_2(nbins)
    block_b = max(16, min(128, triton.next_power_of_2(max(1, 4096 // nbins_pad))))
    if _interpret():
        block_b = max(block_b, 64)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=totals.device)
    block_start = torch.empty(max_blocks, dtype=torch.int32, device=totals.device)
    _route_table_kernel[(triton.cdiv(max_blocks, block_b),)](
        totals,
        offsets,
        block_expert,
        block_start,
        E,
        nbins,
        max_blocks,
        BLOCK_M=block_m,
        NBINS_PAD=nbins_pad,
        BLOCK_B=block_b,
    )
    return block_expert, block_start


def block_table(counts: torch.Tensor, rows: int, block_m: int):
    """Offsets ``[E + 1]`` and the row-tile table for rows already grouped by expert (``counts [E]``)."""
    _check_device(counts)
    E = counts.numel()
    counts = counts.to(torch.int32).contiguous()
    offsets = torch.empty(E + 1, dtype=torch.int32, device=counts.device)
    block_expert, block_start = _table(counts, offsets, E, E, rows, block_m)
    return offsets, block_expert, block_start


def gate_up(x, w_gate, w_up, sorted_idx, offsets, block_expert, block_start, top_k: int, block_m: int, save: bool):
    """``h, g, u`` ``[P, ffn]`` at sorted rows (g and u empty unless ``save``)."""
    _check_device(x, w_gate)
    x, w_gate, w_up = _contig(x, w_gate, w_up)
    P, (_, H, F) = sorted_idx.numel(), w_gate.shape
    h = x.new_empty(P, F)
    g = x.new_empty(P, F) if save else x.new_empty(0)
    u = x.new_empty(P, F) if save else x.new_empty(0)
    bn, bk, opts = _blocks("gate_up", F, H, x.dtype)
    grid = (block_expert.numel(), triton.cdiv(F, bn))
    _gate_up_kernel[grid](
        x,
        sorted_idx,
        w_gate,
        w_up,
        h,
        g,
        u,
        block_expert,
        block_start,
        offsets,
        F,
        H,
        x.stride(0),
        w_gate.stride(0),
        w_gate.stride(1),
        w_gate.stride(2),
        TOP_K=top_k,
        SAVE=save,
        PRECISION=_precision(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **opts,
    )
    return h, g, u


def down(h, w_down, sorted_idx, offsets, block_expert, block_start, block_m: int):
    """``o [P, hidden]``: row p holds pair p's expert output (rows of dropped pairs are not written)."""
    _check_device(h, w_down)
    h, w_down = _contig(h, w_down)
    P, (_, F, H) = sorted_idx.numel(), w_down.shape
    o = h.new_empty(P, H)
    bn, bk, opts = _blocks("down", H, F, h.dtype)
    grid = (block_expert.numel(), triton.cdiv(H, bn))
    _down_kernel[grid](
        h,
        sorted_idx,
        w_down,
        o,
        block_expert,
        block_start,
        offsets,
        H,
        F,
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        PRECISION=_precision(h.dtype),
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **opts,
    )
    return o


def combine(o, weights, eidx, num_experts: int):
    """``y [T, hidden]`` = sum over each token's kept pairs of ``weights * o`` (weights None: plain sum)."""
    _check_device(o, eidx)
    o, eidx = _contig(o, eidx)
    T, k = eidx.shape
    N = o.shape[1]
    y = o.new_empty(T, N)
    if T == 0:
        return y
    bt, bn = (16, max(16, min(128, triton.next_power_of_2(N)))) if _interpret() else (4, 256)
    w = weights.contiguous() if weights is not None else o
    _combine_kernel[(triton.cdiv(T, bt), triton.cdiv(N, bn))](
        o, w, eidx, y, T, N, num_experts, TOP_K=k, HAS_W=weights is not None, BLOCK_T=bt, BLOCK_N=bn
    )
    return y


def combine_bwd(dy, o, eidx, num_experts: int):
    """``dw [T, k]`` float32: ``<dy[t], o[t * k + j]>`` for kept pairs, 0 for dropped ones."""
    _check_device(dy, o)
    dy, o, eidx = _contig(dy, o, eidx)
    T, k = eidx.shape
    N = dy.shape[1]
    dw = torch.empty(T, k, dtype=torch.float32, device=dy.device)
    if T == 0:
        return dw
    bp, bn = (64, max(16, min(128, triton.next_power_of_2(N)))) if _interpret() else (16, 256)
    _combine_bwd_kernel[(triton.cdiv(T * k, bp),)](
        dy, o, eidx, dw, T * k, N, num_experts, TOP_K=k, BLOCK_P=bp, BLOCK_N=bn
    )
    return dw


def down_bwd(dy, weights, w_down, g, u, sorted_idx, offsets, block_expert, block_start, top_k: int, block_m: int):
    """``dg, du`` ``[P, ffn]`` at sorted rows: the SwiGLU backward of ``dh = weights * dy[tok] @ w_down[e]^T``."""
    _check_device(dy, w_down)
    dy, w_down, g, u = _contig(dy, w_down, g, u)
    P, (_, F, H) = sorted_idx.numel(), w_down.shape
    dg = g.new_empty(P, F)
    du = g.new_empty(P, F)
    bn, bk, opts = _blocks("down_bwd", F, H, dy.dtype)
    w = weights.contiguous() if weights is not None else dy
    grid = (block_expert.numel(), triton.cdiv(F, bn))
    _down_bwd_kernel[grid](
        dy,
        w,
        sorted_idx,
        w_down,
        g,
        u,
        dg,
        du,
        block_expert,
        block_start,
        offsets,
        F,
        H,
        w_down.stride(0),
        w_down.stride(1),
        w_down.stride(2),
        TOP_K=top_k,
        HAS_W=weights is not None,
        PRECISION=_precision(dy.dtype),
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **opts,
    )
    return dg, du


def dx(dg, du, w_gate, w_up, sorted_idx, offsets, block_expert, block_start, block_m: int):
    """``dx_pairs [P, hidden]`` at pair ids: ``dg @ w_gate[e]^T + du @ w_up[e]^T`` (dropped rows not written)."""
    _check_device(dg, w_gate)
    dg, du, w_gate, w_up = _contig(dg, du, w_gate, w_up)
    P, (_, H, F) = sorted_idx.numel(), w_gate.shape
    out = dg.new_empty(P, H)
    bn, bk, opts = _blocks("dx", H, F, dg.dtype)
    grid = (block_expert.numel(), triton.cdiv(H, bn))
    _dx_kernel[grid](
        dg,
        du,
        sorted_idx,
        w_gate,
        w_up,
        out,
        block_expert,
        block_start,
        offsets,
        H,
        F,
        w_gate.stride(0),
        w_gate.stride(1),
        w_gate.stride(2),
        PRECISION=_precision(dg.dtype),
        BLOCK_M=block_m,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **opts,
    )
    return out


def expert_dw(a, b, sorted_idx, scale, offsets, top_k: int, a_gather: bool, b_gather: bool):
    """``[E, M, N]``: per expert e, ``A[rows]^T @ (scale * B[rows])`` over e's sorted rows (see ``_dw_kernel``)."""
    _check_device(a, b)
    a, b = _contig(a, b)
    E = offsets.numel() - 1
    M, N = a.shape[1], b.shape[1]
    out = a.new_empty(E, M, N)
    if _interpret():
        bm, bn, bk, opts = (
            max(16, min(64, triton.next_power_of_2(M))),
            max(16, min(64, triton.next_power_of_2(N))),
            64,
            {},
        )
    elif a.dtype == torch.float32:
        bm, bn, bk, opts = 64, 64, 32, {"num_warps": 4, "num_stages": 3}
    else:  # spill-free on sm_90 (see _GPU_TILES)
        bm, bn, bk, opts = 128, 128, 32, {"num_warps": 8, "num_stages": 3}
    s = scale.contiguous() if scale is not None else a
    grid = (E, triton.cdiv(M, bm) * triton.cdiv(N, bn))
    _dw_kernel[grid](
        a,
        b,
        sorted_idx,
        s,
        out,
        offsets,
        M,
        N,
        TOP_K=top_k,
        A_GATHER=a_gather,
        B_GATHER=b_gather,
        B_SCALE=scale is not None,
        PRECISION=_precision(a.dtype),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        **opts,
    )
    return out
