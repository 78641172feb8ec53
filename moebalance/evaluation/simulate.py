"""Scale simulator: how fast and how memory-hungry is one MoE layer under each placement method?

For a model preset (expert shapes from the public configs), a number of devices ``P`` and tokens per device, it
builds the expert loads of an imbalance scenario (the LLEP paper's "x% of the tokens into n experts", Zipf) or
of a recorded layer (``shared/data/routing``), solves the placement problem with each method, and reports, per
method: the makespan under :meth:`CostModel.from_shapes` (seconds), the speedup over ``ep``, the peak memory per
device (weights plus activations, GiB), the gap to the LP bound and the planning time.

Hardware numbers (FLOP/s, link bandwidth, GEMM overhead) are assumptions given as arguments, not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moebalance._validate import MAX_DEVICES, MAX_INT, as_int, check_elements
from moebalance.placement import CostModel, PlacementProblem
from moebalance.plan import peak_memory
from moebalance.registry import solve

__all__ = [
    "ModelPreset",
    "Hardware",
    "MODELS",
    "PAPER_SCENARIOS",
    "DEFAULT_ROUTING_DIR",
    "scenario_loads",
    "real_layers",
    "SimulationResult",
    "simulate",
    "add_simulate_command",
    "load_hardware",
]

GIB = float(2**30)


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """Shapes of one MoE layer: ``experts`` routed experts, top-``k``, SwiGLU expert ``[hidden, ffn]``."""

    name: str
    experts: int
    k: int
    hidden: int
    ffn: int


MODELS: dict[str, ModelPreset] = {
    m.name: m
    for m in [
        ModelPreset("gpt-oss-20b", 32, 4, 2880, 2880),
        ModelPreset("gpt-oss-120b", 128, 4, 2880, 2880),
        ModelPreset("deepseek-v3", 256, 8, 7168, 2048),
        ModelPreset("kimi-k2", 384, 8, 7168, 2048),
        ModelPreset("qwen3-30b-a3b", 128, 8, 2048, 768),
        ModelPreset("mixtral-8x7b", 8, 2, 4096, 14336),
        ModelPreset("olmoe-1b-7b", 64, 8, 2048, 1024),  # for the recorded OLMoE routing
    ]
}


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Assumed device: effective FLOP/s of expert GEMMs, all-to-all/P2P bytes/s, fixed time per expert GEMM.

    Defaults are round assumptions for an NVLink-connected H200-class device (about 60% of ~990 TFLOP/s dense
    bf16, ~450 GB/s per direction, 10 us per GEMM); they are not measured.
    """

    device_flops: float = 6.0e14
    link_bandwidth: float = 4.5e11
    gemm_overhead: float = 1.0e-5
    dtype_bytes: float = 2.0

    def cost(self, model: ModelPreset) -> CostModel:
        return CostModel.from_shapes(
            model.hidden, model.ffn, self.dtype_bytes, self.device_flops, self.link_bandwidth, self.gemm_overhead
        )


# the LLEP paper's imbalance settings: x% of the tokens concentrated into n experts
PAPER_SCENARIOS: tuple[str, ...] = tuple(f"{pct}:{n}" for pct in (30, 50, 80, 95) for n in (1, 4, 16))
DEFAULT_SCENARIOS: tuple[str, ...] = ("balanced",) + PAPER_SCENARIOS + ("zipf:1.2",)
DEFAULT_METHODS: tuple[str, ...] = ("ep", "eplb", "eplb-home", "llep", "llep+", "lp")
# the recorded routing data: $MOEBALANCE_ROUTING_DATA, else `../shared/data/routing` from the current directory
# (the `shared` folder beside a checkout run from its root); never a path inside the installed package
DEFAULT_ROUTING_DIR = Path(os.environ.get("MOEBALANCE_ROUTING_DATA", os.path.join("..", "shared", "data", "routing")))


def _spread(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers proportional to ``weights`` summing to ``total`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    if total == 0 or w.sum() <= 0:
        return np.zeros(w.shape, dtype=np.int64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    rest = int(total - out.sum())
    if rest:
        out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


def scenario_loads(
    scenario: str, model: ModelPreset, num_devices: int, tokens_per_device: int, *, style: str = "even", seed: int = 0
) -> np.ndarray:
    """``[E]`` expert loads (token slots, ``P * tokens_per_device * k`` in all) of one scenario.

    - ``"balanced"``: every expert gets the same share.
    - ``"pct:n"``: ``pct``% of the slots go to experts ``0..n-1`` (the hot experts of the LLEP paper's test,
      all on the first devices), the rest spread over the others. ``style="even"`` splits them evenly;
      ``style="reference"`` reproduces the authors' test generator (``test_llep.py``): token ``i`` of each rank
      sends its ``k`` slots to hot expert ``j % n`` for ``j < k`` (so only ``min(n, k)`` hot experts get tokens)
      or to cold experts ``(i + j) % (E - n)``.
    - ``"zipf:s"``: shares ``1 / rank**s`` over a seeded random permutation of the experts.
    """
    E, k = model.experts, model.k
    P = as_int(num_devices, "num_devices", minimum=1, maximum=MAX_DEVICES)
    T = as_int(tokens_per_device, "tokens_per_device", minimum=1)
    total = P * T * k
    if total > MAX_INT:
        raise ValueError(f"`tokens_per_device` * `num_devices` * k = {total} token slots, over the limit of {MAX_INT}")
    if style == "reference":
        check_elements("tokens_per_device", T, k)
    if scenario == "balanced":
        return _spread(total, np.ones(E))
    kind, _, arg = scenario.partition(":")
    if kind == "zipf":
        s = float(arg)
        rng = np.random.default_rng(seed)
        return _spread(total, (1.0 / np.arange(1, E + 1) ** s)[rng.permutation(E)])
    try:
        pct, n = float(kind), int(arg)
    except ValueError:
        raise ValueError(f"`scenario` must be 'balanced', 'pct:n' or 'zipf:s', got {scenario!r}") from None
    if not (0 <= pct <= 100 and 1 <= n < E):
        raise ValueError(f"`scenario` {scenario!r}: need 0 <= pct <= 100 and 1 <= n < E={E}")
    if style == "reference":
        per_rank = np.zeros(E, dtype=np.int64)
        hot_tokens = int(T * pct / 100)
        for j in range(k):
            per_rank[j % n] += hot_tokens
        cold = np.arange(hot_tokens, T)[:, None] + np.arange(k)[None, :]
        per_rank[n:] += np.bincount((cold % (E - n)).ravel(), minlength=E - n)
        return per_rank * P  # every rank routes the same way
    if style != "even":
        raise ValueError(f"`style` must be 'even' or 'reference', got {style!r}")
    hot = int(round(total * pct / 100))
    loads = np.zeros(E, dtype=np.int64)
    loads[:n] = _spread(hot, np.ones(n))
    loads[n:] = _spread(total - hot, np.ones(E - n))
    return loads


_REAL = {
    "deepseek-v3": ("deepseek_v3_expert_counts.json", "deepseek-v3"),
    "olmoe": ("olmoe_mixtral_expert_counts.json", "olmoe-1b-7b"),
    "mixtral": ("olmoe_mixtral_expert_counts.json", "mixtral-8x7b"),
}


def real_layers(spec: str, routing_dir: str | Path | None = None) -> tuple[ModelPreset, list[tuple[str, np.ndarray]]]:
    """The model preset and ``[(layer name, [E] counts), ...]`` of recorded routing.

    ``spec``: ``"deepseek-v3[:run]"`` (default run ``prefill_in4096``; MoE layers 3-60),
    ``"olmoe[:domain]"`` or ``"mixtral[:domain]"`` (default domain ``c4``; layers 0, 7, 15, all top-k slots).
    Files are read as JSON from ``routing_dir`` (default :data:`DEFAULT_ROUTING_DIR`).
    """
    name, _, sub = spec.partition(":")
    if name not in _REAL:
        raise ValueError(f"`real` must start with one of {', '.join(_REAL)}, got {spec!r}")
    folder = Path(routing_dir) if routing_dir is not None else DEFAULT_ROUTING_DIR
    path = folder / _REAL[name][0]
    if not path.is_file():
        raise ValueError(f"routing data not found: {path} (set `routing_dir` / --routing-data)")
    from ..io import read_json

    data = read_json(path)  # size, depth and duplicate keys checked; ValueError naming the file
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a JSON object of runs, got {type(data).__name__}")
    model = MODELS[_REAL[name][1]]
    out: list[tuple[str, np.ndarray]] = []
    if name == "deepseek-v3":
        run = sub or "prefill_in4096"
        if run not in data:
            raise ValueError(f"unknown DeepSeek-V3 run {run!r}; runs: {', '.join(sorted(data))}")
        if not isinstance(data[run], list):
            raise ValueError(f"{path.name}: run {run!r} must be a list of layers' counts")
        for i, counts in enumerate(data[run]):
            c = _recorded_counts(counts, path, f"{run}/layer{i}")
            if c.sum() > 0:  # layers 0-2 are dense
                out.append((f"{run}/layer{i}", c))
    else:
        key = "olmoe" if name == "olmoe" else "mistral"
        domain = sub or "c4"
        table = data.get(key, {}).get("expert_counts") if isinstance(data.get(key), dict) else None
        if not isinstance(table, dict):
            raise ValueError(f"{path.name}: expected {key!r} -> 'expert_counts' -> {{domain: {{layer: counts}}}}")
        if domain not in table:
            raise ValueError(f"unknown {name} domain {domain!r}; domains: {', '.join(sorted(table))}")
        layers = table[domain]
        if not isinstance(layers, dict) or not all(str(k).isdigit() for k in layers):
            raise ValueError(f"{path.name}: domain {domain!r} must map layer numbers to counts")
        for layer, counts in sorted(layers.items(), key=lambda kv: int(kv[0])):
            out.append((f"{domain}/layer{layer}", _recorded_counts(counts, path, f"{domain}/layer{layer}")))
    for lname, c in out:
        if c.shape != (model.experts,):
            raise ValueError(f"{path.name} {lname}: expected {model.experts} experts, got {c.shape}")
    return model, out


def _recorded_counts(counts: Any, path: Path, name: str) -> np.ndarray:
    """One layer's recorded ``[E]`` counts: non-negative integers, never cast (2.5 is refused, not made 2)."""
    from .._validate import as_int_array

    try:
        shape = np.shape(counts)
    except ValueError:
        shape = None
    if not isinstance(counts, list) or shape is None or len(shape) != 1:
        raise ValueError(f"{path.name} {name}: the counts must be a list of integers")
    try:
        return as_int_array(counts, "counts", shape, minimum=0)
    except ValueError as exc:
        raise ValueError(f"{path.name} {name}: {exc}") from None


def _home(E: int, P: int) -> np.ndarray | None:
    # contiguous blocks; when P does not divide E (or P > E) the blocks differ in size by one
    return None if E % P == 0 else (np.arange(E) * P) // E


@dataclasses.dataclass
class SimulationResult:
    """Rows of a simulation, one per (model, devices, scenario or layer, method).

    Row keys: model, devices, tokens_per_device, scenario, imbalance (EP max/mean device load), method, status,
    makespan_s, speedup (ep makespan / this), peak_gib (largest per-device memory), gap_to_lp
    ((makespan - LP bound) / LP bound), lp_bound_s, planning_s, transfers (weight copies), token_ratio (max / mean
    tokens per device). Rows whose scenario ends in "/all-layers" sum the layers of a recorded run (makespans,
    LP bounds and planning times add up; peak memory and token ratio are the worst layer's).
    """

    rows: list[dict[str, Any]]
    settings: dict[str, Any]

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps({"settings": self.settings, "rows": self.rows}, **kwargs)

    def table(self, *, layers: bool = False) -> str:
        """A text table; per-layer rows of recorded runs only with ``layers=True``."""
        head = [
            "model",
            "P",
            "scenario",
            "imbal",
            "method",
            "makespan ms",
            "speedup",
            "peak GiB",
            "gap LP",
            "tok max/mean",
            "plan ms",
        ]
        body = []
        for r in self.rows:
            if r["layer"] and not layers:
                continue
            body.append(
                [
                    r["model"],
                    str(r["devices"]),
                    r["scenario"],
                    f"{r['imbalance']:.2f}",
                    r["method"],
                    _f(r["makespan_s"], 1e3, ".3f"),
                    _f(r["speedup"], 1, ".2f"),
                    _f(r["peak_gib"], 1, ".2f"),
                    _f(r["gap_to_lp"], 100, ".1f", "%"),
                    _f(r["token_ratio"], 1, ".3f"),
                    _f(r["planning_s"], 1e3, ".3f"),
                ]
            )
        widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
        return "\n".join(lines)

    __str__ = table

    def plot(self, out_dir: str | Path, prefix: str = "simulate") -> list[Path]:
        """PNG plots of speedup and peak memory against imbalance (EP max/mean device load)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ._plotting import finish, style

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [r for r in self.rows if r["makespan_s"] is not None and not r["scenario"].endswith("all-layers")]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        groups = sorted({(r["model"], r["devices"]) for r in rows})
        paths = []
        for key, label, fname in (
            ("speedup", "speedup over EP", "speedup"),
            ("peak_gib", "peak memory per device (GiB)", "peak_memory"),
        ):
            fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4.2), squeeze=False)
            for ax, (model, P) in zip(axes[0], groups):
                mine = [r for r in rows if r["model"] == model and r["devices"] == P]
                for j, m in enumerate(methods):
                    if m == "lp":
                        continue  # a rounded relaxation; its bound is drawn below
                    pts = sorted((r["imbalance"], r[key]) for r in mine if r["method"] == m and r[key] is not None)
                    if pts:
                        xs, ys = zip(*pts)
                        # points of different scenarios, not a curve: distinct hollow markers, no lines
                        ax.plot(xs, ys, **style(j, line=False), label=m)
                if key == "speedup":  # EP makespan over the LP bound: no plan can do better
                    ep = {(r["scenario"], r["layer"]): r["makespan_s"] for r in mine if r["method"] == "ep"}
                    pts = sorted(
                        (r["imbalance"], ep[(r["scenario"], r["layer"])] / r["lp_bound_s"])
                        for r in mine
                        if r["method"] == "lp" and r["lp_bound_s"]
                    )
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, ls=(0, (1, 1)), lw=1.5, color="black", label="LP bound (best possible)")
                ax.set_xscale("log")
                ax.set_xlabel("imbalance (EP max / mean device load)")
                ax.set_ylabel(label)
                ax.set_title(f"{model}, P={P}")
                ax.grid(True, alpha=0.3)
            paths.append(finish(fig, out_dir / f"{prefix}_{fname}.png", dpi=120))
        return paths


def _f(v: Any, scale: float, spec: str, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v * scale, spec) + suffix


def _solve_all(
    problem: PlacementProblem, methods: Sequence[str], model: ModelPreset, dtype_bytes: float, time_limit: float | None
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        s = solve(problem, m, time_limit=time_limit)
        assert isinstance(s, problem.solution_type)  # what solve returns for the family
        ok = s.feasible and s.assignment is not None
        peak = (
            (
                float(
                    peak_memory(
                        problem, s.assignment, hidden=model.hidden, ffn=model.ffn, dtype_bytes=dtype_bytes
                    ).max()
                )
                / GIB
            )
            if ok
            else None
        )
        dl = s.device_loads
        tok = float(dl.max() / dl.mean()) if ok and dl is not None and dl.mean() > 0 else None
        out[m] = {
            "status": s.status.value,
            "makespan_s": s.objective if ok else None,
            "bound": s.bound,
            "peak_gib": peak,
            "planning_s": s.wall_time,
            "token_ratio": tok,
            "transfers": len(s.weight_transfers) if ok and s.weight_transfers is not None else None,
        }
    return out


def simulate(
    model: str | ModelPreset = "gpt-oss-120b",
    devices: int | Iterable[int] = 8,
    tokens_per_device: int = 32768,
    *,
    scenarios: Iterable[str] | None = DEFAULT_SCENARIOS,
    style: str = "even",
    methods: Iterable[str] = DEFAULT_METHODS,
    real: Iterable[str] = (),
    routing_dir: str | Path | None = None,
    hardware: Hardware = Hardware(),
    alpha: float = 1.0,
    min_chunk: int = 1024,
    imbalance_threshold: float | None = 1.3,
    time_limit: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> SimulationResult:
    """Simulate one MoE layer per scenario (and per recorded layer of each ``real`` spec) for every ``P``.

    Args:
      model: a preset name (:data:`MODELS`) or a :class:`ModelPreset`, used for the synthetic scenarios.
      devices: ``P`` or several (8..256; any ``P`` works: when it does not divide ``E`` the home blocks differ
        by one expert, and with ``P > E`` some devices own none).
      tokens_per_device: tokens each device routes (each brings ``k`` slots).
      scenarios: see :func:`scenario_loads`; ``style`` picks how hot scenarios are generated.
      methods: placement methods to compare (``ep`` is always added: speedups are over it); ``lp`` gives
        the bound for the gap column.
      real: recorded routing (see :func:`real_layers`), e.g. ``["deepseek-v3"]``; each layer's counts are
        rescaled to ``P * tokens_per_device * k`` slots of that data's own model, then a whole-model row sums
        the layers.
      hardware: the assumed :class:`Hardware` (cost model and bytes per value).
      alpha, min_chunk, imbalance_threshold: LLEP's parameters.
    """
    preset = MODELS[model] if isinstance(model, str) and model in MODELS else model
    if not isinstance(preset, ModelPreset):
        raise ValueError(f"`model` must be one of {', '.join(MODELS)} or a ModelPreset, got {model!r}")
    Ps = [int(devices)] if np.ndim(devices) == 0 else [int(p) for p in devices]  # type: ignore[arg-type, union-attr]  # np.ndim tells int from iterable
    if not Ps or min(Ps) < 1:
        raise ValueError(f"`devices` must be positive integers, got {devices!r}")
    if int(tokens_per_device) < 1:
        raise ValueError(f"`tokens_per_device` must be >= 1, got {tokens_per_device!r}")
    methods = list(dict.fromkeys(["ep", *methods]))
    reals = [real_layers(spec, routing_dir) + (spec,) for spec in real]
    tasks: list[tuple[ModelPreset, int, str, str | None, np.ndarray]] = []
    for P in Ps:
        for sc in scenarios or ():
            tasks.append(
                (preset, P, sc, None, scenario_loads(sc, preset, P, tokens_per_device, style=style, seed=seed))
            )
        for rmodel, layers, spec in reals:
            total = P * int(tokens_per_device) * rmodel.k
            for lname, counts in layers:
                tasks.append((rmodel, P, spec, lname, _spread(total, counts)))
    it: Iterable[Any] = tasks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(tasks, desc="simulate", unit="layer")
    rows: list[dict[str, Any]] = []
    for pm, P, sc, lname, loads in it:
        cost = hardware.cost(pm)
        problem = PlacementProblem(
            loads,
            P,
            home=_home(pm.experts, P),
            cost=cost,
            alpha=alpha,
            min_chunk=min_chunk,
            imbalance_threshold=imbalance_threshold,
        )
        res = _solve_all(problem, methods, pm, hardware.dtype_bytes, time_limit)
        lp = res.get("lp", {}).get("bound")
        ep_t = res["ep"]["makespan_s"]
        for m in methods:
            r = res[m]
            t = r["makespan_s"]
            rows.append(
                {
                    "model": pm.name,
                    "devices": P,
                    "tokens_per_device": int(tokens_per_device),
                    "scenario": sc,
                    "layer": lname,
                    "imbalance": problem.imbalance_ratio(),
                    "method": m,
                    "status": r["status"],
                    "makespan_s": t,
                    "speedup": (ep_t / t) if (t and ep_t) else None,
                    "peak_gib": r["peak_gib"],
                    "gap_to_lp": ((t - lp) / lp) if (t is not None and lp) else None,
                    "lp_bound_s": lp,
                    "planning_s": r["planning_s"],
                    "transfers": r["transfers"],
                    "token_ratio": r["token_ratio"],
                }
            )
    rows += _whole_model_rows(rows)
    settings = {
        "model": preset.name,
        "devices": Ps,
        "tokens_per_device": int(tokens_per_device),
        "scenarios": list(scenarios or ()),
        "style": style,
        "methods": methods,
        "real": list(real),
        "hardware": dataclasses.asdict(hardware),
        "alpha": alpha,
        "min_chunk": min_chunk,
        "imbalance_threshold": imbalance_threshold,
        "seed": seed,
    }
    return SimulationResult(rows, settings)


def _whole_model_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sum the layers of each recorded run: the model's MoE time is the sum of its layers' makespans."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["devices"], r["scenario"]) for r in rows if r["layer"]))
    for model, P, sc in keys:
        layer_rows = [r for r in rows if r["layer"] and (r["model"], r["devices"], r["scenario"]) == (model, P, sc)]
        methods = list(dict.fromkeys(r["method"] for r in layer_rows))
        tot = {}
        for m in methods:
            rs = [r for r in layer_rows if r["method"] == m]
            ok = all(r["makespan_s"] is not None for r in rs)
            lbs = [r["lp_bound_s"] for r in rs]
            tot[m] = {
                "makespan_s": sum(r["makespan_s"] for r in rs) if ok else None,
                "lp": sum(lbs) if all(b for b in lbs) else None,
                "peak_gib": max((r["peak_gib"] for r in rs if r["peak_gib"] is not None), default=None),
                "planning_s": sum(r["planning_s"] for r in rs),
                "transfers": sum(r["transfers"] or 0 for r in rs),
                "token_ratio": max((r["token_ratio"] for r in rs if r["token_ratio"] is not None), default=None),
                "imbalance": float(np.median([r["imbalance"] for r in rs])),
                "status": "feasible" if ok else "partial",
                "tokens": rs[0]["tokens_per_device"],
            }
        ep_t = tot.get("ep", {}).get("makespan_s")
        for m, v in tot.items():
            t, lp = v["makespan_s"], v["lp"]
            out.append(
                {
                    "model": model,
                    "devices": P,
                    "tokens_per_device": v["tokens"],
                    "scenario": f"{sc}/all-layers",
                    "layer": None,
                    "imbalance": v["imbalance"],
                    "method": m,
                    "status": v["status"],
                    "makespan_s": t,
                    "speedup": (ep_t / t) if (t and ep_t) else None,
                    "peak_gib": v["peak_gib"],
                    "gap_to_lp": ((t - lp) / lp) if (t is not None and lp) else None,
                    "lp_bound_s": lp,
                    "planning_s": v["planning_s"],
                    "transfers": v["transfers"],
                    "token_ratio": v["token_ratio"],
                }
            )
    return out


# ---- command line -----------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def load_hardware(path: str | Path) -> Hardware:
    """The measured :class:`Hardware` in a calibration file (``benchmarks/ep_layer.py --mode calibrate``)."""
    p = Path(path)
    try:
        entry = json.loads(p.read_text(encoding="utf-8"))["hardware"]
        hw = Hardware(**{f.name: float(entry[f.name]) for f in dataclasses.fields(Hardware)})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"`hardware_file` {str(p)!r} has no usable 'hardware' entry: {exc}") from None
    if not all(math.isfinite(v) and v >= 0 for v in dataclasses.astuple(hw)) or hw.device_flops <= 0:
        raise ValueError(f"`hardware_file` {str(p)!r}: hardware numbers must be finite, FLOP/s > 0")
    return hw


def add_simulate_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to an argparse ``subparsers``; it sets ``func`` to run it (returns 0)."""
    p = subparsers.add_parser(
        "simulate",
        help="simulate MoE layer time and memory under each placement method",
        description="Simulate one MoE layer per imbalance scenario (and per recorded layer of real routing data) "
        "and compare placement methods: makespan under a cost model built from the model's expert "
        "shapes and assumed hardware numbers, speedup over standard EP, peak memory per device, gap "
        "to the LP bound and planning time. Prints a table; --out writes JSON and PNG plots.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="gpt-oss-120b", choices=sorted(MODELS), help="model preset (expert shapes)")
    p.add_argument("--devices", type=_int_list, default=[8], help="devices P, comma-separated (e.g. 8,16,32)")
    p.add_argument("--tokens-per-device", type=int, default=32768, help="tokens each device routes")
    p.add_argument(
        "--scenarios",
        type=_str_list,
        default=list(DEFAULT_SCENARIOS),
        help="'balanced', 'pct:n' (pct%% of tokens into n experts), 'zipf:s'; comma-separated; 'none' for none",
    )
    p.add_argument(
        "--style",
        choices=("even", "reference"),
        default="even",
        help="hot-expert loads: split evenly, or the LLEP authors' test generator",
    )
    p.add_argument("--methods", type=_str_list, default=list(DEFAULT_METHODS), help="placement methods")
    p.add_argument(
        "--real",
        action="append",
        default=[],
        help="recorded routing: deepseek-v3[:run], olmoe[:domain], mixtral[:domain] (repeatable)",
    )
    p.add_argument("--routing-data", default=None, help=f"folder of the routing data (default: {DEFAULT_ROUTING_DIR})")
    p.add_argument("--device-flops", type=float, default=Hardware.device_flops, help="assumed effective FLOP/s")
    p.add_argument("--link-bandwidth", type=float, default=Hardware.link_bandwidth, help="assumed bytes/s")
    p.add_argument("--gemm-overhead", type=float, default=Hardware.gemm_overhead, help="assumed s per GEMM")
    p.add_argument("--dtype-bytes", type=float, default=Hardware.dtype_bytes, help="bytes per value")
    p.add_argument(
        "--hardware-file",
        default=None,
        help="a calibration JSON written by `benchmarks/ep_layer.py --mode calibrate`: its measured "
        "'hardware' entry replaces the four assumed numbers above",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="LLEP capacity factor")
    p.add_argument("--min-chunk", type=int, default=1024, help="LLEP minimum spilled GEMM size")
    p.add_argument(
        "--imbalance-threshold",
        type=float,
        default=1.3,
        help="LLEP falls back to EP below this max/mean; 0 disables the fallback",
    )
    p.add_argument("--time-limit", type=float, default=None, help="seconds per solve (milp, lp)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Zipf permutation")
    p.add_argument("--layers", action="store_true", help="print per-layer rows of recorded runs too")
    p.add_argument("--out", default=None, help="folder for simulate.json and the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_simulate_command)
    return p


def run_simulate_command(args: argparse.Namespace) -> int:
    """Run ``moebalance simulate`` from parsed arguments."""
    scenarios = [] if args.scenarios == ["none"] else args.scenarios
    hw = Hardware(args.device_flops, args.link_bandwidth, args.gemm_overhead, args.dtype_bytes)
    if args.hardware_file:
        hw = load_hardware(args.hardware_file)
        print(f"hardware from {args.hardware_file}: {hw}")
    res = simulate(
        args.model,
        args.devices,
        args.tokens_per_device,
        scenarios=scenarios,
        style=args.style,
        methods=args.methods,
        real=args.real,
        routing_dir=args.routing_data,
        hardware=hw,
        alpha=args.alpha,
        min_chunk=args.min_chunk,
        imbalance_threshold=args.imbalance_threshold or None,
        time_limit=args.time_limit,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(res.table(layers=args.layers))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "simulate.json").write_text(res.to_json(indent=1), encoding="utf-8")
        for path in res.plot(out):
            print(f"wrote {path}")
        print(f"wrote {out / 'simulate.json'}")
    return 0
