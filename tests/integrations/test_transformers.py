"""moebalance.integrations.transformers on tiny random models of the six architectures (CPU, no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from moebalance.integrations import transformers as mbt  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
VOCAB = 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is ~10x faster than two contending ones on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(mbt.tiny_config(arch, vocab=VOCAB, **overrides)).float()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a pretrained-like correction, to test its sign
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    return model


def skew(model: torch.nn.Module, shift: float = 2.0) -> None:
    """Every token prefers experts 0 and 1: a shared direction v in the embeddings and routers leaning to it."""
    emb = model.get_input_embeddings().weight
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    with torch.no_grad():
        emb.add_(v * emb.norm(dim=1).mean())
        for _, _, router, _ in mbt._find_blocks(model):
            router.weight.mul_(8.0)  # diverse tokens: router logits of std ~1 instead of ~0.1
            router.weight[:2] += shift * v / router.weight.shape[1] ** 0.5


def tokens(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model, ids):
    """``(logits, {name: grad})`` of a fixed random projection of the logits."""
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    r = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * r).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5, what: str = "") -> None:
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1e-30)
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel} * {scale:.3e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_to_unpatched_and_disable_restores(arch):
    model = build(arch)
    skew(model)
    ids = tokens()
    ref_logits, ref_grads = run(model, ids)
    impl = model.get_experts_implementation()
    ref_state = model.state_dict()
    assert mbt.enable(model) is model
    assert model.config._experts_implementation == mbt.EXPERTS_IMPLEMENTATION
    logits, grads = run(model, ids)
    assert_close(logits, ref_logits, what=f"{arch} logits")
    assert set(model.state_dict()) == set(ref_state)  # balancer "none" adds nothing to the model's state
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], what=f"{arch} grad {n}")
    # load_stats: every layer routes T*k pairs; the loads are the router's own choices
    T = ids.numel()
    stats = mbt.load_stats(model)
    blocks = mbt._find_blocks(model)
    assert len(stats) == len(blocks) == 2
    for s, (_, _, router, _) in zip(stats, blocks):
        k, E = router.top_k, router.weight.shape[0]
        assert s.tokens == T and s.top_k == k and s.loads.shape == (E,) and int(s.loads.sum()) == T * k
        mean = T * k / E
        assert s.max_vio == pytest.approx((s.loads.max() - mean) / mean)
        assert s.balancedness == pytest.approx(mean / s.loads.max())
    # the priced routing rule with a zero price (balancer "loss_free" in eval mode) is the model's own rule
    mbt.disable(model)
    mbt.enable(model, balancer="loss_free")
    model.eval()
    logits2, grads2 = run(model, ids)
    assert_close(logits2, ref_logits, what=f"{arch} priced logits")
    for n in ref_grads:
        assert_close(grads2[n], ref_grads[n], what=f"{arch} priced grad {n}")
    model.train()
    mbt.disable(model, keep_prices=False)
    assert model.get_experts_implementation() == impl
    assert not mbt.is_enabled(model)
    for _, _, router, experts in blocks:
        assert "forward" not in router.__dict__ and not hasattr(router, "moebalance_bias")
        assert not hasattr(experts, "_moebalance")
    logits3, grads3 = run(model, ids)
    assert torch.equal(logits3, ref_logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_from_skewed_router(arch):
    """loss_free and bip lower MaxVio during a short fine-tune; with none it stays high."""
    finals = {}
    for balancer in ("none", "loss_free", "bip"):
        model = build(arch)
        skew(model)
        mbt.enable(model, balancer=balancer, bias_update_rate=0.03)
        first = mbt.biases(model)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        curve = []
        for step in range(20):
            ids = tokens(8, 32, seed=step)
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(np.mean([s.max_vio for s in mbt.load_stats(model)]))
        finals[balancer] = (curve[0], float(np.mean(curve[-5:])))
        if balancer == "none":  # no price steps (DeepSeek's correction bias stays as loaded)
            for b, b0 in zip(mbt.biases(model), first):
                assert torch.equal(b, b0)
    start = finals["none"][0]
    assert start > 1.5, finals  # the skew works: the first batch is far from balanced
    assert finals["none"][1] > 0.7 * start, finals
    assert finals["loss_free"][1] < 0.75 * finals["none"][1], finals
    assert finals["bip"][1] < 0.5 * finals["none"][1], finals


def test_deepseek_bias_is_the_negated_price():
    """DeepSeek-V3 adds e_score_correction_bias to the scores: the balancer's price q is its negation."""
    model = build("deepseek_v3")
    skew(model)
    router = mbt._find_blocks(model)[0][2]
    before = router.e_score_correction_bias.clone()
    mbt.enable(model, balancer="loss_free", bias_update_rate=0.01)
    assert torch.equal(mbt.biases(model)[0], -before)
    model.train()
    model(tokens())
    loads = mbt.load_stats(model)[0].loads
    step = np.sign(loads - loads.mean()) * 0.01  # the price of an overloaded expert rises...
    np.testing.assert_allclose(mbt.biases(model)[0].numpy(), -before.numpy() + step, atol=1e-6)
    # ...so its correction bias (added to the scores) falls; disable keeps the learned correction
    np.testing.assert_allclose(router.e_score_correction_bias.numpy(), before.numpy() - step, atol=1e-6)
    mbt.disable(model)
    np.testing.assert_allclose(router.e_score_correction_bias.numpy(), before.numpy() - step, atol=1e-6)


def test_bias_changes_choices_not_gates():
    """A price moves tokens off expert 0; each kept pair's gate is the router's own score for that expert."""
    model = build("qwen3_moe")
    mbt.enable(model, balancer="loss_free")
    model.eval()
    block = mbt._state(model).blocks[0]
    router = block.router
    h = torch.randn(64, router.weight.shape[1], generator=torch.Generator().manual_seed(5))
    _, _, idx0 = router(h)
    block.set_price(torch.tensor([10.0] + [0.0] * 7))
    _, gates, idx = router(h)
    assert bool((idx0 == 0).any()) and not bool((idx == 0).any())
    probs = torch.softmax(torch.nn.functional.linear(h, router.weight).float(), -1).gather(1, idx)
    torch.testing.assert_close(gates, probs / probs.sum(-1, keepdim=True))


def test_aux_loss_balancer_is_differentiable():
    model = build("mixtral")
    skew(model)
    mbt.enable(model, balancer="aux_loss", aux_loss_coeff=0.1)
    model.train()
    model(tokens())
    aux = mbt.aux_loss(model)
    assert aux.requires_grad and float(aux.detach()) > 0
    E = 8
    # the Switch loss from its definition: coeff * E * sum_e f_e * P_e per layer
    router = mbt._find_blocks(model)[0][2]
    assert float(aux.detach()) == pytest.approx(sum(s.aux_loss for s in mbt.load_stats(model)), rel=1e-5)
    s0 = mbt.load_stats(model)[0]
    assert s0.aux_loss >= 0.1 * E * (1 / E) * 0.999  # f and P are distributions: the loss is >= coeff (uniform)
    aux.backward()
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0


def test_from_config_experts_implementation_and_recorder(tmp_path):
    """`experts_implementation="moebalance"` is a registered transformers option; the recorder's trace reads back."""
    cfg = mbt.tiny_config("olmoe", vocab=VOCAB)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(cfg, experts_implementation="moebalance")
    assert ours.config._experts_implementation == "moebalance"
    ids = tokens()
    assert_close(ours(ids).logits, plain(ids).logits, what="from_config(experts_implementation=moebalance)")
    mbt.enable(plain, balancer="bip")
    plain.train()
    with mbt.LoadRecorder(plain) as rec:
        for step in range(3):
            plain(tokens(2, 8 + step, seed=step))
            assert rec.steps == step + 1
            np.testing.assert_array_equal(rec.trace().loads[-1], np.stack([s.loads for s in mbt.load_stats(plain)]))
    plain(ids)  # closed: not recorded
    for suffix in (".npz", ".json"):
        path = rec.save(tmp_path / f"trace{suffix}")
        tr = mbt.read_trace(path)
        assert tr.shape == (3, 2, 8) and tr.top_k == 2 and tr.model_type == "olmoe"
        assert tr.tokens.tolist() == [16, 18, 20]
        assert (tr.loads.sum(axis=2) == 2 * tr.tokens[:, None]).all()
        problem = tr.placement_problem(step=1, layer=0, num_devices=2)
        np.testing.assert_array_equal(problem.expert_loads, tr.loads[1, 0])
        assert tr.window(1).shape == (2, 2, 8)
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "routing", "loads": []}')
    with pytest.raises(ValueError, match="expert-load trace"):
        mbt.read_trace(bad)


class _MyMoEBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 4)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(4))


def test_unsupported_models_get_clear_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM.*no module with an `experts` child"):
        mbt.enable(dense)
    holder = torch.nn.Sequential(_MyMoEBlock())
    with pytest.raises(ValueError, match="_MyMoEBlock"):
        mbt.enable(holder)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        mbt.enable("mixtral")


def test_bad_arguments_are_refused_before_any_change(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel tests turn the interpreter on in this process
    model = build("mixtral")
    cases = [
        ({"balancer": "magic"}, "`balancer`"),
        ({"backend": "cuda"}, "`backend`"),
        ({"expert_parallel": 1}, "`expert_parallel`"),
        ({"placement": "llep"}, "expert_parallel=True"),
        ({"bias_update_rate": float("nan")}, "`bias_update_rate`"),
        ({"min_chunk": 4}, "unknown option"),
        ({"aux_loss_coeff": -1.0}, "`aux_loss_coeff`"),
        ({"bip_iterations": 0}, "`bip_iterations`"),
        ({"expert_parallel": True}, "torch.distributed"),
        ({"backend": "triton"}, "`backend`"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            mbt.enable(model, **kwargs)
        assert not mbt.is_enabled(model) and model.config._experts_implementation != "moebalance"
    with pytest.raises(ValueError, match="not enabled"):
        mbt.load_stats(model)
    mbt.enable(model)
    with pytest.raises(ValueError, match="already enabled"):
        mbt.enable(model)
    with pytest.raises(ValueError, match="`model_type`"):
        mbt.tiny_config("llama")


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_gradient_checkpointing_recomputes_with_the_forwards_price(arch):
    ids = tokens(4, 16)
    grads, prices = [], []
    for checkpointing in (False, True):
        model = build(arch)
        skew(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        mbt.enable(model, balancer="loss_free", bias_update_rate=0.05)
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        prices.append(mbt.biases(model))
    for a, b in zip(*prices):  # the balancer stepped once, not twice
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], what=f"{arch} grad {n} with checkpointing")


def _train_a_little(model, steps=3, seed=0):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(steps):
        ids = tokens(4, 32, seed=seed + step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("balancer", ["loss_free", "bip", "bip_lagged"])
def test_trained_prices_survive_save_pretrained_and_from_pretrained(arch, balancer, tmp_path):
    model = build(arch)
    skew(model)
    mbt.enable(model, balancer=balancer, bias_update_rate=0.05)
    _train_a_little(model)
    trained = mbt.biases(model)
    assert any(float(q.abs().max()) > 1e-4 for q in trained)  # the prices moved: there is something to lose
    names = [n for n in model.state_dict() if n.endswith(("moebalance_bias", "e_score_correction_bias"))]
    assert len(names) == 2  # one persistent price per MoE layer
    ids = tokens(2, 16, seed=9)
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).float()
    mbt.enable(back, balancer=balancer)
    back.eval()
    for q, q0 in zip(mbt.biases(back), trained):
        torch.testing.assert_close(q, q0, rtol=0, atol=0)
    with torch.no_grad():
        assert_close(back(ids).logits, ref, what=f"{arch} reloaded logits")
    # prices="zeros" starts afresh (the logits of an untrained price differ: the test above is not vacuous)
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path).float()
    mbt.enable(fresh, balancer=balancer, prices="zeros")
    assert all(float(q.abs().max()) == 0 for q in mbt.biases(fresh))


def test_disable_keeps_the_prices_for_the_next_enable_and_load_state_dict_sets_them():
    model = build("qwen3_moe")
    skew(model)
    mbt.enable(model, balancer="loss_free", bias_update_rate=0.05)
    _train_a_little(model)
    trained = mbt.biases(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    mbt.disable(model)  # kept: in state_dict, ignored by the model's own routing
    assert "model.layers.0.mlp.gate.moebalance_bias" in model.state_dict()
    mbt.enable(model, balancer="loss_free")
    for q, q0 in zip(mbt.biases(model), trained):
        assert torch.equal(q, q0)
    mbt.disable(model, keep_prices=False)
    assert not any(k.endswith("moebalance_bias") for k in model.state_dict())
    # load_state_dict into an enabled model sets the prices; a state dict without them keeps the current ones
    other = build("qwen3_moe", seed=1)
    mbt.enable(other, balancer="loss_free")
    other.load_state_dict(sd)
    for q, q0 in zip(mbt.biases(other), trained):
        assert torch.equal(q, q0)
    plain_sd = {k: v for k, v in sd.items() if not k.endswith("moebalance_bias")}
    other.load_state_dict(plain_sd)
    for q, q0 in zip(mbt.biases(other), trained):
        assert torch.equal(q, q0)
    with pytest.raises(ValueError, match="`prices`"):
        mbt.enable(build("qwen3_moe"), balancer="bip", prices=[torch.zeros(3)])


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_meta_device_to_empty_and_init_weights_set_the_price_buffers(arch):
    """transformers' test_init_weights_can_init_buffers on an enabled model: built on meta, enabled,
    materialised with to_empty() and initialised by the model's own init_weights, every buffer equals the one of
    a model built and enabled normally."""

    cfg = mbt.tiny_config(arch, vocab=VOCAB)
    cls = type(AutoModelForCausalLM.from_config(cfg))
    direct = cls(cfg)  # initialised: enable probes the router, and uninitialised memory may tie its logits
    mbt.enable(direct, balancer="bip")
    with torch.device("meta"):
        lazy = cls(cfg)
    mbt.enable(lazy, balancer="bip")
    assert lazy.model.layers[0].mlp.gate.weight.is_meta
    lazy.to_empty(device="cpu")
    with torch.no_grad():  # what uninitialised memory may hold
        for name, buf in lazy.named_buffers():
            if name.endswith("moebalance_bias"):
                buf.fill_(float("nan"))
    lazy.init_weights()
    a, b = dict(direct.named_buffers()), dict(lazy.named_buffers())
    assert sorted(a) == sorted(b) and any(n.endswith(("moebalance_bias", "e_score_correction_bias")) for n in a)
    bad = [n for n in a if not torch.equal(a[n], b[n])]
    assert not bad, bad
    lazy.train()
    ids = tokens()
    lazy(ids, labels=ids).loss.backward()  # runs; the prices stay finite and follow the model's device
    assert all(bool(torch.isfinite(q).all()) and q.device.type == "cpu" for q in mbt.biases(lazy))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_generate_gives_the_same_tokens_with_and_without_our_kernels(arch):
    model = build(arch)
    skew(model)
    model.eval()
    prompt = tokens(2, 6, seed=4)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(prompt, **kw)
        mbt.enable(model, balancer="none")
        ours = model.generate(prompt, **kw)
    assert ref.shape == (2, 14) and torch.equal(ours, ref)
    assert mbt.load_stats(model)[0].tokens == 2  # the last decoding step went through our experts


def test_eval_mode_routes_with_the_trained_prices_or_none_by_choice():
    model = build("qwen3_moe")
    skew(model)
    mbt.enable(model, balancer="bip")
    _train_a_little(model)  # ends in eval mode
    trained = mbt.biases(model)
    ids = tokens(2, 16, seed=11)
    with torch.no_grad():
        priced = model(ids).logits
        assert [torch.equal(a, b) for a, b in zip(mbt.biases(model), trained)] == [True, True]  # no refit in eval
        mbt.disable(model)
        own = model(ids).logits
        mbt.enable(model, balancer="bip", eval_prices="none")
        model.eval()
        assert torch.equal(model(ids).logits, own)
        mbt.disable(model)
        mbt.enable(model, balancer="bip")
        model.eval()
        assert torch.equal(model(ids).logits, priced)
    assert float((priced - own).abs().max()) > 1e-3  # the trained prices change the routing
    with pytest.raises(ValueError, match="`eval_prices`"):
        mbt.disable(model)
        mbt.enable(model, balancer="bip", eval_prices="sometimes")


def _routed(model):
    """Record each router call of the model: ``[(logits, gates, eidx)]`` (the router's outputs)."""
    got = []
    hooks = [
        router.register_forward_hook(lambda m, a, out: got.append(tuple(t.detach() for t in out)))
        for _, _, router, _ in mbt._find_blocks(model)
    ]
    return got, hooks


@pytest.mark.parametrize("arch", ARCHS)
def test_bip_keeps_every_expert_within_capacity_with_the_routers_own_gates(arch):
    """bip in training: at most ceil(T k / E) tokens per expert (plain top-k of the same prices overloads the
    skewed router), k distinct experts per token, gates in the architecture's own convention (proportional to
    softmax / sigmoid of the chosen logits; equal to the router's own gates where its top-k was kept), and
    the gradient reaches the router."""
    from moebalance.routing import expert_capacity

    ids = tokens(4, 64, seed=7)
    over = {}
    for enforce in (True, False):
        model = build(arch)
        skew(model)
        mbt.enable(model, balancer="bip", enforce_capacity=enforce)
        model.train()
        got, hooks = _routed(model)
        model(ids, labels=ids).loss.backward()
        for h in hooks:
            h.remove()
        cap = expert_capacity(ids.numel(), model.config.num_experts_per_tok, mbt.load_stats(model)[0].loads.size, 1.0)
        over[enforce] = max(int(s.loads.max()) - cap for s in mbt.load_stats(model))
        if not enforce:
            continue
        for (_, _, router, _), (logits, gates, eidx) in zip(mbt._find_blocks(model), got):
            assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0
            assert eidx.shape[1] == model.config.num_experts_per_tok
            assert bool((eidx.sort(1).values[:, 1:] != eidx.sort(1).values[:, :-1]).all())  # k distinct
            assert int(torch.bincount(eidx.reshape(-1), minlength=router.weight.shape[0]).max()) <= cap
            lg = logits.float().gather(1, eidx)
            f = lg.sigmoid() if arch == "deepseek_v3" else lg.exp()
            torch.testing.assert_close(gates[:, 1:] / gates[:, :1], f[:, 1:] / f[:, :1], rtol=1e-4, atol=1e-6)
            if arch == "qwen2_moe":  # norm_topk_prob=False: the gate is the softmax probability itself
                torch.testing.assert_close(gates, torch.softmax(logits.float(), -1).gather(1, eidx))
    assert over[True] <= 0, over
    assert over[False] > 0, over  # the check is not vacuous: the prices alone overload an expert


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_bip_capacity_holds_on_tied_scores(arch):
    """A router with all-zero weights scores every expert the same for every token: top-k sends every token to
    the same k experts; bip's capacity still holds exactly (4096 tokens, E=16, k=2: 512 each)."""
    model = build(arch, experts=16)
    with torch.no_grad():
        for _, _, router, _ in mbt._find_blocks(model):
            router.weight.zero_()
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.zero_()
    mbt.enable(model, balancer="bip")
    model.train()
    ids = tokens(32, 128, seed=3)
    model(ids)
    for s in mbt.load_stats(model):
        assert int(s.loads.sum()) == 4096 * 2
        assert int(s.loads.max()) <= 512, s.loads


def test_loss_free_default_rate_follows_the_router_kind():
    """bias_update_rate="auto" (the default): 1e-3 for softmax routers, 1e-2 for DeepSeek-V3's sigmoid router
    (docs/training.md's measurement); a given rate wins."""
    rates = {}
    for arch in ("mixtral", "gpt_oss", "deepseek_v3"):
        model = build(arch)
        mbt.enable(model, balancer="loss_free")
        rates[arch] = {b.balancer.rate for b in mbt._state(model).blocks}
    assert rates == {"mixtral": {1e-3}, "gpt_oss": {1e-3}, "deepseek_v3": {1e-2}}
    model = build("deepseek_v3")
    mbt.enable(model, balancer="loss_free", bias_update_rate=3e-4)
    assert {b.balancer.rate for b in mbt._state(model).blocks} == {3e-4}
    with pytest.raises(ValueError, match="`bias_update_rate`"):
        mbt.enable(build("mixtral"), balancer="loss_free", bias_update_rate="fast")
    with pytest.raises(ValueError, match="`enforce_capacity`"):
        mbt.enable(build("mixtral"), balancer="bip", enforce_capacity=1)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_bip_refits_from_a_price_set_between_steps(arch):
    """bip warm-starts each batch's fit from the price it left (without re-reading it), unless the price was
    changed since: set in place (DeepSeek-V3: its correction bias), or by load_state_dict. The next step then
    refits from the new price: the same prices as a balancer started there on the same batch."""
    from moebalance.integrations._hf_routers import _scores
    from moebalance.solvers.balancers import BIPBalancer

    model = build(arch, experts=16)
    skew(model)
    mbt.enable(model, balancer="bip")
    model.train()
    model(tokens(4, 64, seed=1))
    blocks = mbt._state(model).blocks
    ids = tokens(4, 64, seed=2)
    for change in ("in place", "load_state_dict"):
        new = [torch.rand(b.num_experts, generator=torch.Generator().manual_seed(5)) * 0.2 for b in blocks]
        if change == "in place":
            for b, q in zip(blocks, new):
                b.set_price(q)
        else:
            sd = model.state_dict()
            names = {id(m): n for n, m in model.named_modules()}
            for b, q in zip(blocks, new):
                n = names[id(b.router)]
                sd[f"{n}.e_score_correction_bias" if arch == "deepseek_v3" else f"{n}.moebalance_bias"] = (
                    -q if arch == "deepseek_v3" else q
                )
            model.load_state_dict(sd)
        seen = []
        hooks = [
            b.router.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach().clone()))
            for b in blocks
        ]
        model(ids)
        for h in hooks:
            h.remove()
        for b, q0, h in zip(blocks, new, seen):
            ref = BIPBalancer(b.num_experts, b.top_k)
            ref.bias = q0
            _, scores, _ = _scores(b.kind, b.router, h.reshape(-1, b.hidden))
            want = ref.update(scores.detach())
            assert torch.equal(b.price(), want), (change, b.name)
            assert not torch.equal(want, q0)  # the fit moved it: the comparison is not vacuous


@pytest.mark.parametrize("arch", ["deepseek_v3", "mixtral", "olmoe"])
def test_bip_routes_alike_with_and_without_the_compiled_loops(arch, monkeypatch):
    """A bip training step on the CPU (compiled loops: prices, capacity, DeepSeek-V3's groups) routes exactly
    as the tensor expressions do: the same logits, gradients, prices and loads, step after step."""
    from moebalance.solvers import balancers, routing_prices

    assert routing_prices.has_compiled_loops()  # numba is a dependency: the compiled path must be there
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(routing_prices, "_loops", lambda: {})
            monkeypatch.setattr(balancers, "has_compiled_loops", lambda: False)
        model = build(arch, experts=16)
        skew(model)
        mbt.enable(model, balancer="bip")
        model.train()
        got = []
        for step in range(3):
            logits, grads = run(model, tokens(4, 64, seed=10 + step))
            got.append(
                (logits, grads, [q.clone() for q in mbt.biases(model)], [s.loads for s in mbt.load_stats(model)])
            )
        results.append(got)
    for (l1, g1, q1, s1), (l2, g2, q2, s2) in zip(*results):
        assert torch.equal(l1, l2)
        assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
        assert all(torch.equal(a, b) for a, b in zip(q1, q2))
        assert all(np.array_equal(a, b) for a, b in zip(s1, s2))
    assert any(float(q.abs().max()) > 0 for q in results[0][-1][2])  # prices were needed: not vacuous
