"""moebalance.kernels: every Triton op against its torch reference, and the differentiable expert computation
(Triton, torch grouped_mm, torch loop) against a naive per-token loop, values and every gradient.

Without a GPU the Triton kernels run in Triton's interpreter (fp32, tiny shapes; tests/moe_testing.py sets
TRITON_INTERPRET=1 at collection) and are also compiled for sm_90 without running. With a GPU the same tests
run on CUDA; ``@pytest.mark.gpu`` adds bf16 and larger shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from moebalance.kernels import expert_ffn, moe_experts, ops, reference, resolve_backend  # noqa: E402

from .. import moe_naive  # noqa: E402
from ..moe_testing import DEV, close, exact_fp32  # noqa: F401, I001  (first: TRITON_INTERPRET=1 without a GPU)

BLOCK_M = 16  # several row tiles per expert on the small shapes below


def _routing(T, k, E, *, empty=(), drop=0, seed=0, device=DEV):
    """[T, k] distinct experts per token, none of `empty` chosen, `drop` pairs marked dropped (id E or -1)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    rows = [allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(T)]
    eidx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    flat = eidx.view(-1)
    for i, p in enumerate(torch.randperm(flat.numel(), generator=g)[:drop].tolist()):
        flat[p] = E if i % 2 == 0 else -1
    return eidx.to(device)


def _weights(E, H, F, dtype=torch.float32, seed=1, device=DEV):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s, fan: (torch.randn(*s, generator=g) / fan**0.5).to(device=device, dtype=dtype)  # noqa: E731
    return mk(E, H, F, fan=H), mk(E, H, F, fan=H), mk(E, F, H, fan=F)


# (T, k, E, H, F, empty experts, dropped pairs): odd sizes, empty experts, k = 1, k = E, E a power of two
CASES = [
    (13, 2, 5, 24, 40, (3,), 0),
    (37, 3, 7, 70, 130, (0, 6), 5),  # H, F beyond one block: several K steps and N tiles
    (9, 1, 4, 16, 24, (), 2),
    (6, 4, 4, 20, 18, (), 0),
    (1, 3, 3, 8, 8, (), 0),
]


def _meta_ok(eidx, E, sorted_idx, offsets, block_expert, block_start, block_m):
    """Invariants, checked from the definition (not against the reference)."""
    flat = eidx.reshape(-1).cpu()
    s, off = sorted_idx.cpu().long(), offsets.cpu().long()
    assert sorted(s.tolist()) == list(range(flat.numel()))
    for e in range(E):
        rows = s[off[e] : off[e + 1]]
        assert (flat[rows] == e).all() and rows.tolist() == sorted(rows.tolist())
        assert int(off[e + 1] - off[e]) == int((flat == e).sum())
    assert not ((flat[s[off[E] :]] >= 0) & (flat[s[off[E] :]] < E)).any()
    tiles = [(int(e), int(b)) for e, b in zip(block_expert.cpu(), block_start.cpu()) if e >= 0]
    want = [(e, r) for e in range(E) for r in range(int(off[e]), int(off[e + 1]), block_m)]
    assert tiles == want
    assert (block_expert.cpu()[len(tiles) :] == -1).all()


@pytest.mark.parametrize("T,k,E,H,F,empty,drop", CASES)
def test_routing_metadata(T, k, E, H, F, empty, drop):
    eidx = _routing(T, k, E, empty=empty, drop=drop)
    got = ops.routing_metadata(eidx, E, BLOCK_M)
    want = reference.routing_metadata(eidx.cpu(), E, BLOCK_M)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    _meta_ok(eidx, E, *got, BLOCK_M)


def test_routing_metadata_many_experts_and_empty_batch():
    eidx = _routing(50, 2, 64, empty=tuple(range(0, 64, 3)), drop=4)  # E + 1 bins pad to 128
    _meta_ok(eidx, 64, *ops.routing_metadata(eidx, 64, 32), 32)
    empty = ops.routing_metadata(torch.zeros(0, 2, dtype=torch.long, device=DEV), 5, 16)
    assert empty[0].numel() == 0 and empty[1].tolist() == [0] * 6 and (empty[2] == -1).all()
    counts = torch.tensor([3, 0, 17, 1], device=DEV)
    for a, b in zip(ops.block_table(counts, 21, 16), reference.block_table(counts.cpu(), 21, 16)):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("T,k,E,H,F,empty,drop", CASES[:3])
def test_ops_match_reference(T, k, E, H, F, empty, drop):
    torch.manual_seed(T)
    eidx = _routing(T, k, E, empty=empty, drop=drop)
    wg, wu, wd = _weights(E, H, F)
    x, dy = torch.randn(T, H, device=DEV), torch.randn(T, H, device=DEV)
    gates = torch.rand(T, k, device=DEV)
    meta = reference.routing_metadata(eidx.cpu(), E, BLOCK_M)
    meta = tuple(m.to(DEV) for m in meta)
    kept = slice(0, int(meta[1][-1]))  # sorted rows of kept pairs
    keep = ((eidx >= 0) & (eidx < E)).reshape(-1)  # pair rows that the kernels write
    tol = 1e-5

    got, want = ops.gate_up(x, wg, wu, *meta, k, BLOCK_M, True), reference.gate_up(x, wg, wu, *meta, k, BLOCK_M, True)
    for a, b in zip(got, want):
        close(a[kept], b[kept], tol)
    h, g, u = want
    h_only = ops.gate_up(x, wg, wu, *meta, k, BLOCK_M, False)
    close(h_only[0][kept], h[kept], tol)
    assert h_only[1].numel() == 0
    o = reference.down(h, wd, *meta, BLOCK_M)
    close(ops.down(h, wd, *meta, BLOCK_M)[keep], o[keep], tol)
    for w in (gates, None):
        close(ops.combine(o, w, eidx, E), reference.combine(o, w, eidx, E), tol)
    close(ops.combine_bwd(dy, o, eidx, E), reference.combine_bwd(dy, o, eidx, E), tol)
    for w in (gates, None):
        for a, b in zip(
            ops.down_bwd(dy, w, wd, g, u, *meta, k, BLOCK_M), reference.down_bwd(dy, w, wd, g, u, *meta, k, BLOCK_M)
        ):
            close(a[kept], b[kept], tol)
    dg, du = reference.down_bwd(dy, gates, wd, g, u, *meta, k, BLOCK_M)
    close(ops.dx(dg, du, wg, wu, *meta, BLOCK_M)[keep], reference.dx(dg, du, wg, wu, *meta, BLOCK_M)[keep], tol)
    for args in (
        (h, dy, meta[0], gates, meta[1], k, False, True),
        (x, dg, meta[0], None, meta[1], k, True, False),
        (h, h, meta[0], None, meta[1], k, False, False),
    ):
        close(ops.expert_dw(*args), reference.expert_dw(*args), tol)


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = fn(*inputs)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y))  # no all-ones grad
    return [y.detach()] + [t.grad for t in inputs]


@pytest.mark.parametrize("T,k,E,H,F,empty,drop", CASES)
def test_moe_experts_all_backends_match_naive(T, k, E, H, F, empty, drop):
    torch.manual_seed(k * T)
    eidx = _routing(T, k, E, empty=empty, drop=drop)
    x = torch.randn(T, H, device=DEV)
    gates = torch.rand(T, k, device=DEV)
    inputs = (x, gates, *_weights(E, H, F))

    def naive(x, gates, wg, wu, wd):
        return moe_naive.experts_per_token(x, eidx, gates, wg, wu, wd)

    want = _grads(naive, [t.double().cpu() for t in inputs])
    for backend, impl in (("triton", "auto"), ("torch", "loop"), ("torch", "auto")):

        def run(x, gates, wg, wu, wd, *, backend=backend, impl=impl):
            return moe_experts(x, eidx, gates, wg, wu, wd, backend=backend, block_m=BLOCK_M, torch_impl=impl)

        got = _grads(run, inputs)
        for name, a, b in zip(("y", "x", "gates", "w_gate", "w_up", "w_down"), got, want):
            assert a is not None, name
            close(a, b, 1e-4)


def test_expert_ffn_all_backends_match_naive():
    counts = [4, 0, 11, 1, 6]
    H, F = 24, 40
    x = torch.randn(sum(counts), H, device=DEV)
    inputs = (x, *_weights(len(counts), H, F))
    want = _grads(
        lambda x, wg, wu, wd: moe_naive.ffn_per_row(x, counts, wg, wu, wd), [t.double().cpu() for t in inputs]
    )
    for backend, c in (("triton", torch.tensor(counts, device=DEV)), ("torch", counts)):
        got = _grads(
            lambda x, wg, wu, wd, *, c=c, backend=backend: expert_ffn(
                x, c, wg, wu, wd, backend=backend, block_m=BLOCK_M
            ),
            inputs,
        )
        for a, b in zip(got, want):
            close(a, b, 1e-4)


def test_triton_path_is_deterministic_and_skips_saving_without_grad():
    eidx = _routing(23, 3, 6, drop=3)
    x, gates = torch.randn(23, 20, device=DEV), torch.rand(23, 3, device=DEV)
    w = _weights(6, 20, 28)
    a = moe_experts(x, eidx, gates, *w, backend="triton", block_m=BLOCK_M)
    b = moe_experts(x, eidx, gates, *w, backend="triton", block_m=BLOCK_M)
    assert torch.equal(a, b)  # the combine is a fixed-order second pass, no atomics
    with torch.no_grad():
        assert torch.equal(moe_experts(x.requires_grad_(), eidx, gates, *w, backend="triton", block_m=BLOCK_M), a)


def test_custom_ops_pass_opcheck():
    """Schemas and fake implementations agree with the real kernels (what torch.compile relies on)."""
    T, k, E, H, F = 11, 2, 4, 16, 24
    eidx = _routing(T, k, E, drop=2)
    wg, wu, wd = _weights(E, H, F)
    x, dy, gates = torch.randn(T, H, device=DEV), torch.randn(T, H, device=DEV), torch.rand(T, k, device=DEV)
    meta = ops.routing_metadata(eidx, E, BLOCK_M)
    h, g, u = ops.gate_up(x, wg, wu, *meta, k, BLOCK_M, True)
    o = torch.randn(T * k, H, device=DEV)
    calls = [
        (ops.routing_metadata, (eidx, E, BLOCK_M)),
        (ops.block_table, (torch.tensor([3, 0, 5, 2], device=DEV), 10, BLOCK_M)),
        (ops.gate_up, (x, wg, wu, *meta, k, BLOCK_M, True)),
        (ops.gate_up, (x, wg, wu, *meta, k, BLOCK_M, False)),
        (ops.down, (h, wd, *meta, BLOCK_M)),
        (ops.combine, (o, gates, eidx, E)),
        (ops.combine_bwd, (dy, o, eidx, E)),
        (ops.down_bwd, (dy, gates, wd, g, u, *meta, k, BLOCK_M)),
        (ops.dx, (g, u, wg, wu, *meta, BLOCK_M)),
        (ops.expert_dw, (x, g, meta[0], None, meta[1], k, True, False)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_the_triton_path():
    T, k, E, H, F = 10, 2, 4, 16, 24
    eidx = _routing(T, k, E)
    inputs = (torch.randn(T, H, device=DEV), torch.rand(T, k, device=DEV), *_weights(E, H, F))

    def run(x, gates, wg, wu, wd):
        return moe_experts(x, eidx, gates, wg, wu, wd, backend="triton", block_m=BLOCK_M)

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for a, b in zip(_grads(compiled, inputs), _grads(run, inputs)):
        close(a, b, 1e-6)


def test_bad_arguments_raise_value_errors(monkeypatch):
    eidx = _routing(5, 2, 4)
    x, gates = torch.randn(5, 8, device=DEV), torch.rand(5, 2, device=DEV)
    wg, wu, wd = _weights(4, 8, 12)
    bad = [
        ("backend", dict(backend="cuda")),
        ("torch_impl", dict(backend="torch", torch_impl="fast")),
        ("block_m", dict(backend="triton", block_m=24)),
    ]
    for name, kw in bad:
        with pytest.raises(ValueError, match=name):
            moe_experts(x, eidx, gates, wg, wu, wd, **kw)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, eidx, gates, wg, wu, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="w_up"):
        moe_experts(x, eidx, gates, wg, wu.double(), wd)
    with pytest.raises(ValueError, match="`x`"):
        moe_experts(x[:, :5], eidx, gates, wg, wu, wd)
    with pytest.raises(ValueError, match="eidx"):
        moe_experts(x, eidx.float(), gates, wg, wu, wd)
    with pytest.raises(ValueError, match="gates"):
        moe_experts(x, eidx, gates[:, :1], wg, wu, wd)
    with pytest.raises(ValueError, match="counts"):
        expert_ffn(x, [2, 2, 2, 2], wg, wu, wd)  # adds up to 8, x has 5 rows
    with pytest.raises(ValueError, match="counts"):
        expert_ffn(x, [5, 0], wg, wu, wd)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_import_needs_no_triton():
    """`import moebalance.kernels` and the torch path work with triton unimportable."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moebalance.kernels as K\n"
        "from moebalance.integrations.torch import MoEConfig, MoELayer\n"
        "layer = MoELayer(MoEConfig(hidden=8, ffn=8, num_experts=4, top_k=2))\n"
        "y = layer(torch.randn(3, 8)); y.sum().backward()\n"
        "assert K.resolve_backend('auto', torch.device('cpu')) == 'torch'\n"
        "assert sys.modules['triton'] is None and y.shape == (3, 8)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


def test_triton_kernels_compile_for_sm90():
    """The real (not interpreted) compiler accepts every kernel for an H100/H200, down to a cubin, without a GPU."""
    script = os.path.join(os.path.dirname(__file__), "triton_sm90_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count(" ok ") == 12


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("E", [16, 256])
def test_gpu_triton_matches_torch(dtype, tol, block_m, E):
    T, k, H, F = 1031, 4, 256, 384
    eidx = _routing(T, k, E, empty=(5,), drop=40)
    inputs = (
        torch.randn(T, H, device="cuda", dtype=dtype),
        torch.rand(T, k, device="cuda"),
        *_weights(E, H, F, dtype=dtype),
    )
    ref = _grads(
        lambda *a: moe_experts(
            a[0].float(), eidx, a[1], *[w.float() for w in a[2:]], backend="torch", torch_impl="loop"
        ),
        inputs,
    )
    got = _grads(lambda *a: moe_experts(*a[:1], eidx, *a[1:], backend="triton", block_m=block_m), inputs)
    for a, b in zip(got, ref):
        scale = b.abs().max().clamp_min(1.0)
        assert ((a.float() - b.float()).abs().max() / scale) < tol


def test_expert_ffn_backward_from_a_sum_grouped_mm():
    # out.sum().backward() hands torch._grouped_mm a stride-0 gradient, which its backward rejects unless we
    # make it contiguous first
    from moebalance.kernels.experts import expert_ffn

    torch.manual_seed(0)
    E, H, F_ = 3, 16, 32
    x = torch.randn(10, H, requires_grad=True)
    w = [(torch.randn(E, a, b) * 0.1).requires_grad_() for a, b in [(H, F_), (H, F_), (F_, H)]]
    grads = {}
    for impl in ("grouped_mm", "loop"):
        try:
            out = expert_ffn(x, [4, 0, 6], *w, backend="torch", torch_impl=impl)
        except ValueError:  # this torch has no fp32 grouped_mm on CPU
            continue
        out.sum().backward()
        grads[impl] = x.grad.clone()
        x.grad = None
    assert "loop" in grads
    if "grouped_mm" in grads:
        assert torch.allclose(grads["grouped_mm"], grads["loop"], atol=1e-5)


def test_loop_fallback_splits_the_weights_once():
    """The loop path's backward must not build a full [E, H, F] gradient per expert (what indexing ``w[e]`` per
    expert does: one SelectBackward per expert, each scattering into a zero tensor of the whole stack); the
    weights are split once (one UnbindBackward per stacked weight), and the gradients still match the naive
    per-token loop."""
    torch.manual_seed(0)
    E, H, F_ = 6, 8, 12
    eidx = _routing(20, 2, E, empty=(4,), drop=3, device="cpu")
    x = torch.randn(20, H, requires_grad=True)
    gates = torch.rand(20, 2, requires_grad=True)
    w = [t.requires_grad_() for t in _weights(E, H, F_, device="cpu")]
    y = moe_experts(x, eidx, gates, *w, backend="torch", torch_impl="loop")
    kinds: dict[str, int] = {}
    seen, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kinds[type(fn).__name__] = kinds.get(type(fn).__name__, 0) + 1
        stack.extend(f for f, _ in fn.next_functions)
    assert kinds.get("UnbindBackward0") == 3, kinds
    assert not any(k.startswith("SelectBackward") for k in kinds), kinds
    y.square().sum().backward()
    got = [x.grad, gates.grad] + [t.grad for t in w]
    xs, gs, ws = x.detach().requires_grad_(), gates.detach().requires_grad_(), [t.detach().requires_grad_() for t in w]
    moe_naive.experts_per_token(xs, eidx, gs, *ws).square().sum().backward()
    for a, b in zip(got, [xs.grad, gs.grad] + [t.grad for t in ws]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_expert_capacity_is_the_one_formula():
    """``expert_capacity`` against exact rational arithmetic, and the layer, the balancer and the routing problem
    all use it (same capacity for the same T, k, E, factor)."""
    import math
    from fractions import Fraction

    import numpy as np

    from moebalance import RoutingProblem
    from moebalance.routing import expert_capacity

    for T, k, E, cf in [
        (10, 2, 4, 1.1),
        (40, 3, 7, 1.0),
        (7, 1, 7, 1.0),
        (1000, 8, 64, 1.25),
        (0, 2, 4, 1.0),
        (5, 1, 6, 1.2),
        (3, 2, 5, 0.5),
        (10**9, 8, 384, 1.0),
    ]:
        want = math.ceil(Fraction(cf) * T * k / E - Fraction(1, 10**9))
        assert expert_capacity(T, k, E, cf) == want, (T, k, E, cf)
        if 0 < T < 10**4 and cf >= 1:  # the routing problem's default capacity is the same number
            assert RoutingProblem(np.zeros((T, E)), k, capacity_factor=cf).capacity[0] == want
    for bad, name in [
        ((-1, 2, 4, 1.0), "num_tokens"),
        ((4, 2, 0, 1.0), "num_experts"),
        ((4, 2, 4, 0.0), "capacity_factor"),
        ((4, 2, 4, float("nan")), "capacity_factor"),
        ((4, True, 4, 1.0), "k"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            expert_capacity(*bad)
