"""MoEBalanceCallback: per-layer MaxVio in the Trainer's logs (seen by the reporting callbacks), a load
trace the trace tools read, and the worked example of docs/training.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from moebalance.integrations import transformers as mbt  # noqa: E402
from moebalance.integrations.trainer import MoEBalanceCallback  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _model(balancer="bip", E=8, k=2):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mbt.tiny_config("mixtral", experts=E, top_k=k))
    return mbt.enable(model, balancer=balancer)


class _State:
    def __init__(self):
        self.log_history, self.global_step, self.is_world_process_zero = [], 0, True


def _max_vio(loads, tokens, k):
    mean = tokens * k / loads.shape[-1]
    return (loads.max(-1) - mean) / mean


def test_logged_max_vio_is_the_mean_of_each_forwards_load_stats(tmp_path):
    model = _model()
    cb = MoEBalanceCallback(trace_path=tmp_path / "t.json")
    cb.on_train_begin(None, _State(), None, model=model)
    g = torch.Generator().manual_seed(1)
    seen = []
    model.train()
    for _ in range(3):
        model(torch.randint(0, 256, (2, 32), generator=g))
        seen.append([s.max_vio for s in mbt.load_stats(model)])
    state = _State()
    logs = {"loss": 1.0}
    state.global_step = 3
    state.log_history.append({**logs, "step": 3})
    cb.on_log(None, state, None, logs=logs)
    seen = np.array(seen)
    assert logs["moe/max_vio"] == pytest.approx(seen.mean())
    assert logs["moe/max_vio_sup"] == pytest.approx(seen.max())
    for i, name in enumerate(cb.layers):
        assert logs[f"moe/max_vio/{name}"] == pytest.approx(seen[:, i].mean())
    assert state.log_history[-1]["moe/max_vio"] == logs["moe/max_vio"]
    logs2 = {"loss": 0.5}
    cb.on_log(None, state, None, logs=logs2)
    assert logs2 == {"loss": 0.5}  # nothing new since the last log event
    # evaluation forwards: their own prefix, and MaxVio of the loads summed over the set
    model.eval()
    loads = []
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(0, 256, (2, 32), generator=g))
            loads.append(np.stack([s.loads for s in mbt.load_stats(model)]))
    ev = {"eval_loss": 2.0}
    cb.on_log(None, state, None, logs=ev)
    assert ev["eval_moe/max_vio_global"] == pytest.approx(_max_vio(sum(loads), 128, 2).mean())
    assert "moe/max_vio" not in ev
    cb.on_train_end(None, state, None)
    trace = mbt.read_trace(tmp_path / "t.json")
    assert trace.shape == (3, 2, 8) and trace.top_k == 2 and list(trace.tokens) == [64] * 3
    assert np.allclose(_max_vio(trace.loads, 64, 2), seen)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="trace_path"):
        MoEBalanceCallback(trace_path="loads.csv")
    with pytest.raises(ValueError, match="log_loads"):
        MoEBalanceCallback(log_loads=1)
    with pytest.raises(ValueError, match="trainer"):
        MoEBalanceCallback().install(object())
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(mbt.tiny_config("mixtral"))
    with pytest.raises(ValueError, match="enable"):
        MoEBalanceCallback().on_train_begin(None, _State(), None, model=plain)


def _docs_example() -> str:
    text = (ROOT / "docs" / "training.md").read_text()
    blocks = re.findall(r"```python[^\n]*\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "MoEBalanceCallback" in b and "trainer.train()" in b]
    assert found, "docs/training.md lost its worked Trainer example"
    return found[0]


class _Reporter(TrainerCallback):
    """Stands in for TensorBoard / W&B: what it gets in on_log is what they would write."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_docs_example_runs_and_reporters_see_the_metrics(tmp_path, monkeypatch):
    import accelerate  # noqa: F401  (the Trainer needs it: installed with the hf extra)
    import transformers

    monkeypatch.chdir(tmp_path)
    reporter = _Reporter()
    real = transformers.Trainer.__init__

    def with_reporter(self, *a, **kw):  # the example's Trainer, with a reporter before our callback
        kw["callbacks"] = [reporter, *(kw.get("callbacks") or [])]
        real(self, *a, **kw)

    monkeypatch.setattr(transformers.Trainer, "__init__", with_reporter)
    ns: dict = {}
    exec(compile(_docs_example(), "docs/training.md", "exec"), ns)
    trainer, model = ns["trainer"], ns["model"]
    logged = [h for h in trainer.state.log_history if "moe/max_vio" in h]
    assert len(logged) == trainer.state.max_steps // trainer.args.logging_steps
    reported = [r for r in reporter.logs if "moe/max_vio" in r]
    assert [r["moe/max_vio"] for r in reported] == [h["moe/max_vio"] for h in logged]
    trace = ns["trace"]
    assert trace.shape[0] == trainer.state.max_steps  # one training forward per step
    # the trace's last step is the model's last training forward, as load_stats saw it then
    assert logged[-1]["moe/max_vio"] == pytest.approx(
        _max_vio(trace.loads[-trainer.args.logging_steps :], trace.tokens[-1], trace.top_k).mean()
    )
    assert "eval_moe/max_vio_global" in ns["metrics"] and mbt.is_enabled(model)
