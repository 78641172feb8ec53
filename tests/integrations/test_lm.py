"""moebalance.integrations.lm: shapes, configuration checks, causal masking, the balance statistics, the
same-batch BIP pricing, and that training lowers the loss on a tiny repeated text."""

from __future__ import annotations

import pytest
import torch
from moebalance.integrations.lm import VOCAB, LMConfig, MoELM


def _model(seed: int = 0, **kw) -> MoELM:
    cfg = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, num_experts=6, top_k=2)
    cfg.update(kw)
    torch.manual_seed(seed)
    return MoELM(LMConfig(**cfg))


def test_shapes_and_statistics():
    model = _model()
    idx = torch.randint(0, VOCAB, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, VOCAB) and torch.isfinite(logits).all()
    loads = model.loads()
    assert loads.shape == (2, 6)
    assert torch.equal(loads.sum(1), torch.full((2,), 3.0 * 11 * 2))  # every token sends k pairs per layer
    mean = loads.mean(1)
    torch.testing.assert_close(model.max_vio(), (loads.max(1).values - mean) / mean)
    assert model.config.ffn == 4 * 32 // 2 and LMConfig(top_k=8, d_model=64).ffn == 32


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(n_heads=3), "n_heads"),
        (dict(top_k=7), "top_k"),
        (
            dict(
                balancer="aux",
            ),
            "balancer",
        ),
        (dict(bip_same_batch=True), "bip_same_batch"),
        (dict(expert_ffn=0), "expert_ffn"),
        (dict(d_model=0), "d_model"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        _model(**kw)


def test_bad_input_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="idx"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model.loss(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="forward"):
        _model().max_vio()


def test_causal_masking():
    """A change at position j leaves the logits at positions < j unchanged, and changes later ones."""
    model = _model(balancer="loss_free").eval()  # eval: no price update between the two forwards
    idx = torch.randint(0, VOCAB, (2, 12))
    j = 7
    other = idx.clone()
    other[:, j] = (other[:, j] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(idx), model(other)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().amax() > 1e-4


def test_aux_loss_only_for_the_aux_balancer():
    idx = torch.randint(0, VOCAB, (2, 10))
    aux = _model(balancer="aux_loss", aux_loss_coeff=0.1)
    aux(idx)
    total = aux.aux_loss()
    assert total.requires_grad and float(total.detach()) > 0
    torch.testing.assert_close(total, aux.moe_layers[0].aux_loss + aux.moe_layers[1].aux_loss)
    none = _model(balancer="none")
    none(idx)
    assert float(none.aux_loss()) == 0.0


def test_same_batch_pricing_balances_the_batch_it_routes():
    """With a skewed router, bip_same_batch routes the very first batch far more evenly than plain bip, whose
    prices are still zero at the first forward (so it routes exactly like no balancer)."""
    plain = _model(balancer="bip_lagged", num_experts=8)
    same = _model(balancer="bip", num_experts=8, bip_same_batch=True)
    none = _model(balancer="none", num_experts=8)
    with torch.no_grad():
        for block in plain.blocks:  # a shared offset in the normalised input that router row 0 reads: a hot expert
            block.norm2.bias.fill_(0.5)
            block.moe.router.weight[0] += 0.1
    same.load_state_dict(plain.state_dict())
    none.load_state_dict(plain.state_dict())
    idx = torch.randint(0, VOCAB, (8, 16))
    vio = {}
    for name, m in (("plain", plain), ("same", same), ("none", none)):
        m.train()
        m(idx)
        vio[name] = m.max_vio()
    torch.testing.assert_close(vio["plain"], vio["none"])
    assert (vio["none"] > 1.0).all(), vio
    assert (vio["same"] < 0.5 * vio["none"]).all(), vio
    assert all(float(layer.bias.abs().sum()) > 0 for layer in same.moe_layers)


@pytest.mark.parametrize("balancer", ["loss_free", "bip"])
def test_loss_decreases_on_a_repeated_text(balancer):
    torch.manual_seed(0)
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8))
    model = _model(balancer=balancer, max_seq_len=32, num_experts=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.stack([text[i : i + 33] for i in range(0, 160, 20)]).long()
    first = None
    for _ in range(40):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        first = loss.item() if first is None else first
    assert first > 5.0  # about log(256) at initialisation
    assert loss.item() < 0.4 * first, (first, loss.item())
