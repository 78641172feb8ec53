"""Naive per-token MoE oracles for the kernel and layer tests: Python loops, float64, nothing shared with the code
under test (routing, capacity and the expert FFN are re-derived from their definitions)."""

from __future__ import annotations

import math

import torch


def expert(x, e, w_gate, w_up, w_down):
    """SwiGLU expert e on one row x [H]."""
    g = x @ w_gate[e]
    return (g * torch.sigmoid(g) * (x @ w_up[e])) @ w_down[e]


def experts_per_token(x, eidx, gates, w_gate, w_up, w_down):
    """y[t] = sum_j gates[t, j] * expert_{eidx[t, j]}(x[t]); ids outside [0, E) are dropped pairs."""
    E = w_gate.shape[0]
    rows = []
    for t in range(x.shape[0]):
        acc = x.new_zeros(w_down.shape[2])
        for j in range(eidx.shape[1]):
            e = int(eidx[t, j])
            if 0 <= e < E:
                acc = acc + gates[t, j] * expert(x[t], e, w_gate, w_up, w_down)
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, w_down.shape[2])


def ffn_per_row(x_sorted, counts, w_gate, w_up, w_down):
    """Row r through the expert that owns it (experts own consecutive runs of `counts` rows)."""
    owners = [e for e, c in enumerate(counts) for _ in range(c)]
    return torch.stack([expert(x_sorted[r], e, w_gate, w_up, w_down) for r, e in enumerate(owners)])


def route(logits, k, router, bias, normalize):
    """Per-token routing from the definition: top-k of scores - bias, ties to the lower expert index."""
    scores = torch.softmax(logits, -1) if router == "softmax" else torch.sigmoid(logits)
    T, E = scores.shape
    eidx = torch.zeros(T, k, dtype=torch.long)
    gates = []
    for t in range(T):
        key = [(-(float(scores[t, e].detach()) - float(bias[e])), e) for e in range(E)]
        chosen = [e for _, e in sorted(key)[:k]]
        eidx[t] = torch.tensor(chosen)
        g = torch.stack([scores[t, e] for e in chosen])
        gates.append(g / g.sum() if normalize else g)
    return eidx, torch.stack(gates), scores


def capacity_drop(eidx, scores, capacity_factor):
    """Replace pairs over capacity by E: per expert keep the highest scores, ties to the lower token."""
    T, k = eidx.shape
    E = scores.shape[1]
    cap = math.ceil(capacity_factor * T * k / E - 1e-9)
    out = eidx.clone()
    for e in range(E):
        pairs = [(-float(scores[t, e].detach()), t, j) for t in range(T) for j in range(k) if int(eidx[t, j]) == e]
        for _, t, j in sorted(pairs)[cap:]:
            out[t, j] = E
    return out


def layer_forward(config, x, router_w, w_gate, w_up, w_down, bias):
    """MoELayer's output from its parameters (any dtype; pass float64 leaves), token by token."""
    c = config
    x2 = x.reshape(-1, c.hidden)
    eidx, gates, scores = route(x2 @ router_w.T, c.top_k, c.router, bias, c.normalize_gates)
    kept = eidx if c.capacity_factor is None else capacity_drop(eidx, scores, c.capacity_factor)
    y = experts_per_token(x2, kept, gates, w_gate, w_up, w_down)
    return y.reshape(x.shape), eidx, kept, scores
