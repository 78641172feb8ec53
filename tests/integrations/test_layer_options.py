"""One layer, one behaviour: every ``MoEConfig`` option behaves identically in the single-device
``MoELayer`` and in ``ExpertParallelMoE`` (two gloo ranks, forward and backward, two training steps), or both
refuse it with a ValueError. Class 6 (layer part): both layers refuse non-float, numpy and 0-d inputs.

The cases are keyed by the dataclass fields: a new ``MoEConfig`` field without a case here fails
``test_every_option_has_a_case``. All cases run in one launch (starting two torch processes costs seconds).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from moebalance.integrations.torch import MoEConfig, MoELayer

from tests.integrations.test_distributed import TOL, _launch

# field -> configs that set it to non-default values (over the base: hidden 12, ffn 20, E 8, k 2, torch
# backend, float32, 95%-skewed routing, LLEP placement with min_chunk 4)
OPTION_CASES: dict[str, list[dict]] = {
    "hidden": [{"hidden": 16}],
    "ffn": [{"ffn": 8}],
    "num_experts": [{"num_experts": 4}],
    "top_k": [{"top_k": 1}, {"top_k": 3}],
    "router": [{"router": "sigmoid"}],
    "normalize_gates": [{"normalize_gates": False}],
    "balancer": [{"balancer": "loss_free"}, {"balancer": "bip"}, {"balancer": "bip_lagged"}, {"balancer": "aux_loss"}],
    "bias_update_rate": [{"balancer": "loss_free", "bias_update_rate": 0.05}],
    "aux_loss_coeff": [{"balancer": "aux_loss", "aux_loss_coeff": 0.5}],
    "capacity_factor": [{"capacity_factor": 1.0}, {"capacity_factor": 1.25, "balancer": "bip"}],
    # "auto" is torch on CPU; "triton" cannot run on CPU tensors: both layers refuse it the same way (the
    # workers run with TRITON_INTERPRET=0 whatever the kernel tests set in this process: tests/integrations/test_distributed.py)
    "backend": [{"backend": "auto"}, {"backend": "triton", "refused": True}],
    "dtype": [{"dtype": "bfloat16"}],
    "enforce_capacity": [{"balancer": "bip", "enforce_capacity": False}],  # the default (True): the bip cases
    "bip_same_batch": [
        {"balancer": "bip", "bip_same_batch": True},
        {"balancer": "bip", "bip_same_batch": True, "capacity_factor": 1.5},
    ],
}
WORLD = 2
# what tests/integrations/test_distributed.py's _layer sets when a case does not (the base every case departs from)
BASE = {"hidden": 12, "ffn": 20, "num_experts": 8, "top_k": 2, "backend": "torch", "dtype": "float32"}


def _refused(cfg: dict) -> bool:
    return bool(cfg.get("refused", False))


def _flat_cases() -> list[tuple[str, dict]]:
    return [(field, cfg) for field, cfgs in OPTION_CASES.items() for cfg in cfgs]


def test_every_option_has_a_case():
    fields = {f.name for f in dataclasses.fields(MoEConfig)}
    assert set(OPTION_CASES) == fields, f"MoEConfig options without an equality case: {fields - set(OPTION_CASES)}"
    base = {f.name: f.default for f in dataclasses.fields(MoEConfig)} | BASE
    for field, cfgs in OPTION_CASES.items():
        for cfg in cfgs:  # each case really sets its option away from the base
            assert field in cfg and cfg[field] != base[field], (field, cfg)


@pytest.fixture(scope="module")
def option_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("options")
    cases = [
        {"field": f, "config": {k: v for k, v in c.items() if k != "refused"}, "refused": _refused(c)}
        for f, c in _flat_cases()
    ]
    (out / "options.json").write_text(json.dumps(cases))
    results, codes, log = _launch("options", WORLD, out, limit=240.0)
    assert codes == [0] * WORLD, log
    return results


@pytest.mark.parametrize("field", sorted(OPTION_CASES))
def test_option_behaves_the_same_in_both_layers(field, option_results):
    idx = [i for i, (f, _) in enumerate(_flat_cases()) if f == field]
    assert idx
    for i in idx:
        cfg = _flat_cases()[i][1]
        per_rank = [r["cases"][i] for r in option_results]
        if _refused(cfg):
            for c in per_rank:
                assert c["refused"]["layer"].startswith("ValueError"), c
                assert c["refused"]["ep"].startswith("ValueError"), c
                assert c["refused"]["layer"] == c["refused"]["ep"], c  # the same check refuses it
            continue
        for rank, c in enumerate(per_rank):
            # forward (out), backward (dx, router, the three expert weights), aux loss and bias, both steps
            assert set(c["errors"]) == {"out", "dx", "router", "w_gate", "w_up", "w_down", "aux", "bias"}
            bad = {k: v for k, v in c["errors"].items() if v > c["tol"]}
            assert not bad, f"{field}={cfg}: rank {rank} differs from MoELayer: {bad}"
            assert c["plans"] == per_rank[0]["plans"], f"{field}={cfg}: ranks planned differently"
            assert c["ep_dropped"] == c["ref_dropped"], f"{field}={cfg}: dropped pairs differ"
            # the statistics come from the same functions: equal MaxVio on every step
            assert np.allclose(c["ep_max_vio"], c["max_vio"], rtol=1e-5, atol=1e-6), (c["ep_max_vio"], c["max_vio"])
        c = per_rank[0]
        assert c["tol"] == (2e-2 if cfg.get("dtype") == "bfloat16" else TOL)
        if cfg.get("balancer") in ("loss_free", "bip", "bip_lagged"):
            assert max(map(abs, c["bias"][-1])) > 0, f"{field}={cfg}: the bias never moved (vacuous)"
        if cfg.get("capacity_factor") == 1.0:
            assert c["dropped"] > 0, f"{field}={cfg}: nothing dropped (vacuous)"


def test_bip_same_batch_prices_the_first_batch(option_results):
    """Non-vacuity of the bip_same_batch case: priced before routing, the very first batch is better balanced
    than with the prices of the batches before (zero on step 1)."""
    cases = _flat_cases()
    plain = option_results[0]["cases"][cases.index(("balancer", {"balancer": "bip_lagged"}))]
    same = option_results[0]["cases"][cases.index(("bip_same_batch", OPTION_CASES["bip_same_batch"][0]))]
    assert same["max_vio"][0] < plain["max_vio"][0], (same["max_vio"], plain["max_vio"])


@pytest.mark.parametrize(
    "bad, what",
    [
        (np.zeros((4, 8), dtype=np.float32), "numpy"),
        (torch.tensor(1.0), "0-d"),
        (torch.ones(4, 8, dtype=torch.int64), "int"),
        (torch.ones(4, 8, dtype=torch.bool), "bool"),
        (torch.ones(4, 8, dtype=torch.complex64), "complex"),
        (torch.ones(4, 7), "width"),
    ],
)
def test_layer_refuses_bad_inputs_naming_x(bad, what):
    layer = MoELayer(MoEConfig(hidden=8, ffn=8, num_experts=4, top_k=2, backend="torch"))
    with pytest.raises(ValueError, match="`x`"):
        layer(bad)
