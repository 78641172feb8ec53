"""The replication MILP of one layer as sparse arrays (private: ``milp`` builds it, ``lp`` relaxes part of it).

Per layer, loads normalised by the mean GPU load (so tolerances act on numbers of order 1):

    minimise   mean_b T_b
    s.t.  sum_k z[e, k] = 1                                   every expert takes one replica count k
          sum_g y[e, k, g] = k z[e, k]                        its k replicas sit on GPUs
          sum_{e, k} y[e, k, g] = S                           every GPU holds S slots
          sum_{e, k} (w[b, e] / k) y[e, k, g] <= T_b          every GPU, every batch
          nodes:  sum_n u[q, n] = 1;  sum_{k, g in n} y[e, k, g] <= k_max[e] u[q(e), n]
          moves:  m[g, e] <= sum_k y[e, k, g], 0 <= m <= old[g, e], sum m >= R - max_moves
          z, u binary; y integer in [0, min(k, S)]

Counts are restricted to ``k_lo[e] <= k <= k_lo[e] + (R - sum k_lo)`` with ``k_lo = ceil(mean_b w[b, e] / U)``
for the objective ``U`` of a known plan: a replica's load never exceeds its GPU's, so every plan at least as
good as that one has those counts (the optimum included). With one batch and no nodes or old plan, GPUs are
interchangeable, so their loads are ordered (symmetry breaking).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

__all__ = ["LayerModel", "build_layer"]


@dataclasses.dataclass
class LayerModel:
    """Sparse model of one layer: ``A_lo <= A x <= A_hi``, ``lb <= x <= ub``, minimise ``c x``."""

    A: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    lb: np.ndarray
    ub: np.ndarray
    c: np.ndarray
    integer: np.ndarray  # [n] bool
    e_of: np.ndarray  # [nz] expert of each z column
    k_of: np.ndarray  # [nz] its count
    G: int
    nz: int  # z columns come first, then y (nz * G, ordered z-major, GPU minor), then T (B), then the rest
    B: int
    scale: float


def build_layer(
    w: np.ndarray,
    R: int,
    G: int,
    upper: float,
    *,
    groups: int = 1,
    nodes: int = 1,
    old_counts: np.ndarray | None = None,
    max_moves: int | None = None,
) -> LayerModel:
    """The MILP of one layer with loads ``w [B, E]``; ``upper`` the objective of a known plan of this layer."""
    B, E = w.shape
    S = R // G
    scale = float(w.sum(axis=1).mean() / G) or 1.0
    wn = w / scale
    U = upper / scale
    klo = np.maximum(1, np.ceil(wn.mean(axis=0) / U * (1 - 1e-12) - 1e-12)).astype(np.int64)
    slack = R - int(klo.sum())
    if slack < 0:  # cannot happen for a valid incumbent; fall back to every count
        klo, slack = np.ones(E, dtype=np.int64), R - E
    e_of = np.repeat(np.arange(E), slack + 1)
    k_of = (klo[:, None] + np.arange(slack + 1)[None, :]).ravel()
    nz = e_of.size
    ny = nz * G
    # columns: z [nz], y [nz*G], T [B], u [groups*nodes] (nodes > 1), m [G*E] (old plan)
    col_y = nz
    col_T = nz + ny
    col_u = col_T + B
    nu = groups * nodes if nodes > 1 else 0
    col_m = col_u + nu
    nm = G * E if old_counts is not None else 0
    n = col_m + nm
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(rr, cc, vv):
        rows.append(np.asarray(rr).ravel())
        cols.append(np.asarray(cc).ravel())
        vals.append(np.broadcast_to(np.asarray(vv, dtype=np.float64), np.shape(rr)).ravel())

    # sum_k z = 1
    add(e_of, np.arange(nz), 1.0)
    lo.append(np.ones(E))
    hi.append(np.ones(E))
    r += E
    # sum_g y - k z = 0
    zi = np.arange(nz)
    yi = col_y + zi[:, None] * G + np.arange(G)[None, :]
    add(np.broadcast_to(r + zi[:, None], yi.shape), yi, 1.0)
    add(r + zi, zi, -k_of.astype(np.float64))
    lo.append(np.zeros(nz))
    hi.append(np.zeros(nz))
    r += nz
    # slots per GPU
    add(np.broadcast_to(r + np.arange(G)[None, :], yi.shape), yi, 1.0)
    lo.append(np.full(G, float(S)))
    hi.append(np.full(G, float(S)))
    r += G
    # loads per GPU and batch
    per = wn[:, e_of] / k_of[None, :]  # [B, nz]
    for b in range(B):
        add(np.broadcast_to(r + np.arange(G)[None, :], yi.shape), yi, np.broadcast_to(per[b][:, None], yi.shape))
        add(r + np.arange(G), np.full(G, col_T + b), -1.0)
        lo.append(np.full(G, -np.inf))
        hi.append(np.zeros(G))
        r += G
    if nodes > 1:
        gsize = E // groups
        gpn = G // nodes
        q = np.arange(groups)
        add(np.broadcast_to(r + q[:, None], (groups, nodes)), col_u + q[:, None] * nodes + np.arange(nodes), 1.0)
        lo.append(np.ones(groups))
        hi.append(np.ones(groups))
        r += groups
        kmax = (klo + slack).astype(np.float64)
        node_of_g = np.arange(G) // gpn
        # row (e, n): sum_{k, g in n} y - kmax_e u[q(e), n] <= 0
        rr = r + e_of[:, None] * nodes + node_of_g[None, :]
        add(np.broadcast_to(rr, yi.shape), yi, 1.0)
        en = np.arange(E)[:, None] * nodes + np.arange(nodes)[None, :]
        add(
            r + en,
            col_u + (np.arange(E)[:, None] // gsize) * nodes + np.arange(nodes)[None, :],
            np.broadcast_to(-kmax[:, None], en.shape),
        )
        lo.append(np.full(E * nodes, -np.inf))
        hi.append(np.zeros(E * nodes))
        r += E * nodes
    if old_counts is not None:
        # m[g, e] - sum_k y[e, k, g] <= 0
        mi = col_m + np.arange(G)[None, :] * E + e_of[:, None]  # [nz, G] column of m[g, e_of]
        add(np.broadcast_to(r + (mi - col_m), yi.shape), yi, -1.0)
        add(r + np.arange(G * E), col_m + np.arange(G * E), 1.0)
        lo.append(np.full(G * E, -np.inf))
        hi.append(np.zeros(G * E))
        r += G * E
        add(np.full(G * E, r), col_m + np.arange(G * E), 1.0)
        lo.append(np.array([float(R - (max_moves if max_moves is not None else R))]))
        hi.append(np.array([np.inf]))
        r += 1
    if B == 1 and nodes == 1 and old_counts is None and G > 1:
        # load[g] >= load[g + 1]
        g = np.arange(G - 1)
        add(np.broadcast_to(r + g[None, :], (nz, G - 1)), yi[:, :-1], np.broadcast_to(per[0][:, None], (nz, G - 1)))
        add(np.broadcast_to(r + g[None, :], (nz, G - 1)), yi[:, 1:], np.broadcast_to(-per[0][:, None], (nz, G - 1)))
        lo.append(np.zeros(G - 1))
        hi.append(np.full(G - 1, np.inf))
        r += G - 1
    A = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, n))
    lb = np.zeros(n)
    ub = np.full(n, np.inf)
    ub[:nz] = 1.0
    ub[col_y:col_T] = np.repeat(np.minimum(k_of, S), G).astype(np.float64)
    ub[col_u:col_m] = 1.0
    if old_counts is not None:
        ub[col_m:] = old_counts.reshape(G * E).astype(np.float64)
    lb[col_T : col_T + B] = wn.sum(axis=1) / G  # the mean GPU load
    c = np.zeros(n)
    c[col_T : col_T + B] = 1.0 / B
    integer = np.zeros(n, dtype=bool)
    integer[:col_T] = True
    integer[col_u:col_m] = True
    return LayerModel(A, np.concatenate(lo), np.concatenate(hi), lb, ub, c, integer, e_of, k_of, G, nz, B, scale)


def hint_vector(
    m: LayerModel, gpu_counts: np.ndarray, E: int, w: np.ndarray, old_counts: np.ndarray | None, groups: int, nodes: int
) -> np.ndarray | None:
    """The model's variables for a plan given as ``gpu_counts [G, E]`` (None if its counts are out of range)."""
    n = m.A.shape[1]
    x = np.zeros(n)
    cnt = gpu_counts.sum(axis=0)
    idx = np.full(E, -1)
    for i in range(m.nz):
        if m.k_of[i] == cnt[m.e_of[i]]:
            idx[m.e_of[i]] = i
    if np.any(idx < 0):
        return None
    x[idx] = 1.0
    G = m.G
    col_y = m.nz
    for e in range(E):
        x[col_y + idx[e] * G : col_y + (idx[e] + 1) * G] = gpu_counts[:, e]
    col_T = col_y + m.nz * G
    loads = (gpu_counts * (w / np.maximum(cnt, 1)[None, :])[:, None, :]).sum(axis=2) / m.scale  # [B, G]
    x[col_T : col_T + m.B] = loads.max(axis=1)
    col_u = col_T + m.B
    if nodes > 1:
        gpn = G // nodes
        gsize = E // groups
        for q in range(groups):
            node = int(np.flatnonzero(gpu_counts[:, q * gsize : (q + 1) * gsize].sum(axis=1) > 0)[0]) // gpn
            x[col_u + q * nodes + node] = 1.0
        col_u += groups * nodes
    if old_counts is not None:
        x[col_u:] = np.minimum(old_counts, gpu_counts).reshape(-1)
    return x
