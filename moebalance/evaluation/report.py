"""``moebalance report``: one self-contained Markdown report of every benchmark, with its PNG plots.

It reads the JSON files the benchmarks wrote, from a results folder (``--results``, default ``benchmarks/results``
under the current directory, where it exists, then the report's own folder):

1. the routing-solver benchmark (``routing_solvers.json``, and ``routing_solvers_target.json`` when present);
2. the placement gap table (``placement.json``);
3. the simulator's speedup and peak-memory curves, computed here with
   :func:`moebalance.evaluation.simulate.simulate`: the LLEP paper's scenarios and the recorded routing
   (``--routing-data``), under assumed hardware and, where a calibration file ``ep_cost_model_*.json`` exists,
   under that measured cost model;
4. the balancer training study (``balancer_study.json``).

The report goes to ``<out>`` (default ``moebalance_results/report.md`` under the current directory, never a folder
the user did not name or the repository's) and its plots to the folder ``<out stem>_files`` beside it. A missing input is
named in the report with the command that makes it ("not yet run: ..."). The benchmarks are scripts of the
repository, not of the package: the report never runs them. ``run_quick=True`` (``--run-quick``) runs, in this
process, the quick version of the one input the package itself can make (the training study), into the plots
folder. Nothing is written outside ``<out>`` and its plots folder. matplotlib is imported by the plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_report", "ReportResult", "INPUTS", "add_report_command", "run_report_command", "main"]

# relative to the current directory, never to the installed package: read from (a checkout's benchmark results)
DEFAULT_RESULTS = Path("benchmarks") / "results"
# ... and written to: one folder of its own, named in --help
DEFAULT_OUT = Path("moebalance_results") / "report.md"


@dataclasses.dataclass(frozen=True)
class _Input:
    full: str  # file name of the full run, in the results folder
    quick: str  # file name of the quick run
    command: str  # how to make the full run (from a checkout's root)
    quick_command: str  # how to make the quick run


INPUTS: dict[str, _Input] = {
    "routing": _Input(
        "routing_solvers.json",
        "routing_solvers_quick.json",
        "python benchmarks/routing_solvers.py",
        "python benchmarks/routing_solvers.py --quick --out benchmarks/results/routing_solvers_quick.json",
    ),
    "placement": _Input(
        "placement.json",
        "placement_quick.json",
        "python benchmarks/placement.py",
        "python benchmarks/placement.py --quick --out benchmarks/results/placement_quick.json",
    ),
    "calibration": _Input(
        "ep_cost_model_*.json",
        "ep_cost_model_quick.json",
        "python benchmarks/ep_layer.py --mode calibrate --small",
        "python benchmarks/ep_layer.py --mode calibrate --small --out benchmarks/results/ep_cost_model_quick.json",
    ),
    "study": _Input(
        "balancer_study.json",
        "balancer_study_quick.json",
        "python benchmarks/balancer_study.py",
        "moebalance report --run-quick",
    ),
}


@dataclasses.dataclass
class ReportResult:
    """Where the report went, its plots, the inputs it read (name -> path) and the ones it did not find."""

    path: Path
    plots: list[Path]
    inputs: dict[str, list[str]]
    missing: dict[str, str]
    markdown: str


# ---- helpers -----------------------------------------------------------------------------------------------
def _table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _pct(v: Any, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}%"


def _num(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _gap(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return "0" if v == 0 else f"{v:.1e}" if abs(v) < 1e-2 else f"{v:.3f}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def style(i: int, **kw: Any) -> dict[str, Any]:
    from ._plotting import style as _style

    return _style(i, **kw)


def finish(fig: Any, path: Path) -> Path:
    from ._plotting import finish as _finish

    return _finish(fig, path)


def _find(name: str, folders: Sequence[Path], *, quick: bool) -> list[Path]:
    spec = INPUTS[name]
    pattern = spec.quick if quick else spec.full
    for folder in folders:
        hits = sorted(p for p in folder.glob(pattern) if p.is_file() and (quick or not p.name.endswith("_quick.json")))
        if hits:
            return hits
    return []


def _quick_study(assets: Path, progress: bool) -> None:
    from .study import StudyConfig, run_study, write_outputs

    write_outputs(run_study(StudyConfig.quick(), progress=progress), assets, "balancer_study_quick")


# ---- 1. routing solvers ------------------------------------------------------------------------------------
def _routing_section(
    data: dict[str, Any], target: dict[str, Any] | None, assets: Path, source: str
) -> tuple[str, list[Path]]:
    cfg, mach = data.get("config", {}), data.get("machine", {})
    methods = cfg.get("methods") or sorted({m for i in data["instances"] for m in i["results"]})
    insts = data["instances"]
    lines = [
        "## 1. Routing solvers",
        "",
        f"Source: `{source}`{' (quick run)' if cfg.get('quick') else ''}. Machine: {mach.get('cpu_model', '?')}, "
        f"{mach.get('cores', '?')} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in mach.get('load_average_at_start') or [])}. "
        f'Instances: `routing_problem(T, E, k, kind="zipf")`, capacity factor {cfg.get("capacity_factor")}; '
        f"time limit {cfg.get('time_cap_s')} s per method; gap = (optimum - objective) / optimum, the optimum "
        f"being {cfg.get('reference', 'mcf')}'s.",
        "",
    ]
    summary = []
    for m in methods:
        rs = [i["results"].get(m, {}) for i in insts]
        ran = [r for r in rs if r and not r.get("skipped")]
        feas = [r for r in ran if r.get("feasible")]
        gaps = [r["gap_to_opt"] for r in feas if r.get("gap_to_opt") is not None]
        times = [r["wall_time"] for r in ran if r.get("wall_time") is not None]
        statuses: dict[str, int] = {}
        for r in ran:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        summary.append(
            [
                m,
                f"{len(ran)}/{len(insts)}",
                _gap(float(np.median(gaps)) if gaps else None),
                _gap(max(gaps) if gaps else None),
                _num(float(np.median(times)) if times else None),
                _num(max(times) if times else None),
                ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
            ]
        )
    lines += [
        "Per method over the grid (gaps of feasible answers only; top-k ignores capacity, so its answers are "
        "infeasible and its objective is an upper bound):",
        "",
        _table(["method", "ran", "median gap", "max gap", "median time s", "max time s", "statuses"], summary),
        "",
    ]
    rows = []
    for i in insts:
        cells = [str(i["T"]), str(i["E"]), str(i["k"])]
        for m in methods:
            r = i["results"].get(m)
            if not r:
                cells.append("-")
            elif r.get("skipped"):
                cells.append("skipped")
            elif not r.get("feasible"):
                cells.append(f"{_num(r.get('wall_time'))} s, {r['status']}")
            else:
                g = r.get("gap_to_opt")
                cells.append(
                    f"{_num(r.get('wall_time'))} s"
                    + ("" if g == 0 else f", gap {_gap(g)}")
                    + (" (limit)" if r["status"] == "time_limit" else "")
                )
        rows.append(cells)
    lines += [
        "Every instance (wall time; gap to the optimum where it is not 0):",
        "",
        _table(["T", "E", "k", *methods], rows),
        "",
    ]
    targets = list(data.get("targets", []))
    if target:
        targets += [
            dict(t, line=t["line"] + f" (separate run: `{target.get('config', {}).get('command', '?')}`)")
            for t in target.get("targets", [])
        ]
    if targets:
        lines += ["Targets:", ""] + [f"- {t['line']}" for t in targets] + [""]
    plots = _routing_plots(insts, methods, assets)
    lines += [f"![{p.stem}]({p.parent.name}/{p.name})" for p in plots] + [""]
    return "\n".join(lines), plots


def _routing_plots(insts: list[dict[str, Any]], methods: Sequence[str], assets: Path) -> list[Path]:
    plt = _plt()
    ks = sorted({i["k"] for i in insts})
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(4.6 * (len(ks) + 1), 4.0), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for j, m in enumerate(methods):
            pts = sorted(
                (i["T"] * i["E"], i["results"][m]["wall_time"])
                for i in insts
                if i["k"] == k
                and m in i["results"]
                and not i["results"][m].get("skipped")
                and i["results"][m].get("wall_time") is not None
            )
            if pts:
                ax.plot(*zip(*pts), **style(j, line=False), label=m)  # T x E mixes E values: no lines
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("T x E (score entries)")
        ax.set_ylabel("wall time (s)")
        ax.set_title(f"k={k}")
        ax.grid(True, alpha=0.3)
    ax = axes[0][-1]
    floor = 1e-10
    for j, m in enumerate(methods):
        gaps = [
            max(i["results"][m]["gap_to_opt"], floor)
            for i in insts
            if m in i["results"] and i["results"][m].get("feasible") and i["results"][m].get("gap_to_opt") is not None
        ]
        ax.plot(np.full(len(gaps), j) + np.linspace(-0.2, 0.2, len(gaps)), gaps, **style(j, line=False))
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(f"gap to the optimum (floored at {floor:g})")
    ax.set_title("gap of feasible answers")
    ax.grid(True, alpha=0.3)
    return [finish(fig, assets / "routing_solvers.png")]


# ---- 2. placement ------------------------------------------------------------------------------------------
HEUR = ("ep", "eplb", "eplb-home", "llep", "llep+")


def _placement_section(data: dict[str, Any], assets: Path, source: str) -> tuple[str, list[Path]]:
    gt = data.get("gap_table", {})
    summary = gt.get("summary", {})
    lines = [
        "## 2. Placement: each method's gap to the optimum",
        "",
        f"Source: `{source}`{' (quick run)' if 'quick' in Path(source).name else ''}. Makespans under the "
        "simulator's cost model (assumed hardware "
        f"{data.get('hardware_assumed')}); gap = (makespan - best bound) / best bound, the best bound being the "
        "larger of the MILP (OR-Tools SCIP, time-limited) and LP bounds, so a gap is an upper bound on the "
        "distance to the true optimum.",
        "",
    ]
    if summary:
        rows = [
            [
                name,
                str(s.get("instances")),
                *[_pct(s.get(f"{m}_median_gap")) for m in HEUR],
                f"{_pct(s.get('llep+_closes_median_vs_best_plan'), 0)} / "
                f"{_pct(s.get('llep+_closes_median_vs_bound'), 0)}",
                _num(s.get("llep_time_median_ms")),
                _num(s.get("llep+_time_median_ms")),
            ]
            for name, s in summary.items()
        ]
        lines += [
            "Median gap per instance set:",
            "",
            _table(["set", "instances", *HEUR, "llep+ closes (best plan / bound)", "llep ms", "llep+ ms"], rows),
            "",
        ]
    rows = gt.get("rows", [])
    if rows:
        body = [
            [
                r["set"],
                str(r["instance"]).replace("prefill_in4096/", ""),
                *[_pct(r.get(f"{m}_gap")) for m in HEUR],
                _pct((r["best_plan"] - r["best_bound"]) / r["best_bound"]) if r.get("best_bound") else "-",
                r.get("milp_status", "-"),
            ]
            for r in rows
        ]
        lines += [
            "<details><summary>Every instance</summary>",
            "",
            _table(["set", "instance", *HEUR, "best plan", "milp"], body),
            "",
            "</details>",
            "",
        ]
    ms = data.get("milp_scaling", {}).get("rows", [])
    if ms:
        lines += [
            f"MILP scaling (limit {data['milp_scaling'].get('time_limit_s')} s):",
            "",
            _table(
                ["E", "P", "status", "time s", "gap", "llep+ / milp"],
                [
                    [
                        str(r["E"]),
                        str(r["P"]),
                        r["status"],
                        _num(r["time_s"]),
                        _num(r.get("gap"), ".2e"),
                        _num(r["llep+"] / r["objective"] if r.get("objective") else None, ".4f"),
                    ]
                    for r in ms
                ],
            ),
            "",
        ]
    pt = data.get("planning_time", {}).get("rows", [])
    if pt:
        lines += [
            "Planning time at E=384, P=64 (median ms):",
            "",
            _table(
                ["scenario", "llep_plan", "paper loop", "solve llep", "solve llep+"],
                [
                    [
                        r["scenario"],
                        _num(r["llep_plan_ms"]),
                        _num(r["reference_loop_ms"]),
                        _num(r["solve_llep_ms"]),
                        _num(r["solve_llep+_ms"]),
                    ]
                    for r in pt
                ],
            ),
            "",
        ]
    plots = _placement_plot(summary, assets) if summary else []
    lines += [f"![{p.stem}]({p.parent.name}/{p.name})" for p in plots] + [""]
    return "\n".join(lines), plots


def _placement_plot(summary: dict[str, Any], assets: Path) -> list[Path]:
    plt = _plt()
    sets = list(summary)
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    width = 0.8 / len(HEUR)
    for j, m in enumerate(HEUR):
        vals = [max(summary[s].get(f"{m}_median_gap") or 0.0, 1e-5) for s in sets]
        ax.bar(
            np.arange(len(sets)) + (j - (len(HEUR) - 1) / 2) * width,
            vals,
            width,
            label=m,
            color=style(j)["color"],
            hatch=("", "//", "..", "xx", "\\\\")[j % 5],
            edgecolor="black",
            lw=0.5,
        )
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels(sets, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median gap to the best bound (floored at 1e-5)")
    ax.set_title("placement: gap to optimal (lower is better)")
    ax.grid(True, axis="y", alpha=0.3)
    return [finish(fig, assets / "placement_gaps.png")]


# ---- 3. simulator ------------------------------------------------------------------------------------------
REAL_SPECS = ("deepseek-v3", "olmoe", "mixtral")


def _sim_tables(res: Any, *, real: bool) -> str:
    rows = [r for r in res.rows if r["layer"] is None and r["scenario"].endswith("all-layers") == real]
    keys = list(dict.fromkeys((r["model"], r["devices"], r["scenario"]) for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("lp", "ep")))
    body = []
    for key in keys:
        by = {r["method"]: r for r in rows if (r["model"], r["devices"], r["scenario"]) == key}
        first = next(iter(by.values()))
        lp = by.get("lp", {}).get("lp_bound_s")
        ep = by.get("ep", {}).get("makespan_s")
        body.append(
            [
                key[0],
                str(key[1]),
                key[2],
                _num(first["imbalance"], ".2f"),
                *[_num(by[m]["speedup"], ".2f") + "x" if m in by and by[m]["speedup"] else "-" for m in methods],
                _num(ep / lp, ".2f") + "x" if ep and lp else "-",
                *[_num(by[m]["peak_gib"], ".1f") if m in by else "-" for m in ("ep", "llep")],
            ]
        )
    head = [
        "model",
        "P",
        "scenario",
        "imbalance",
        *[f"{m} speedup" for m in methods],
        "LP bound speedup",
        "EP peak GiB",
        "LLEP peak GiB",
    ]
    return _table(head, body)


def _simulate_section(
    routing_dir: Path | None, calibrations: list[Path], assets: Path, *, devices: int, tokens: int, progress: bool
) -> tuple[str, list[Path], dict[str, str]]:
    from .simulate import DEFAULT_ROUTING_DIR, MODELS, PAPER_SCENARIOS, Hardware, ModelPreset, real_layers, simulate

    folder = Path(routing_dir) if routing_dir is not None else DEFAULT_ROUTING_DIR
    missing: dict[str, str] = {}
    real = []
    for spec in REAL_SPECS:
        try:
            real_layers(spec, folder)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            missing[f"routing data {spec}"] = f"not usable: {exc} (give the folder with --routing-data)"
        else:
            real.append(spec)
    lines = [
        "## 3. Simulated speedup and peak memory",
        "",
        f"Computed now with `moebalance.evaluation.simulate.simulate` (P={devices}, {tokens} tokens per device; methods "
        "ep, eplb, eplb-home, llep, llep+, and lp for the bound): the LLEP paper's scenarios (`pct:n` = pct% of "
        f"the token slots into n experts) and the recorded routing in `{folder}` "
        f"({', '.join(real) if real else 'not found'}), whose per-layer rows are summed over each model's "
        "layers. Speedups are over EP; 'LP bound speedup' is EP's makespan over the LP bound, the most any "
        "plan could give.",
        "",
    ]
    plots: list[Path] = []
    runs = [("assumed", "Assumed hardware (H200-class round numbers, not measured)", Hardware(), "gpt-oss-120b")]
    for cal in calibrations:
        data = _read_json(cal)
        hw = Hardware(**{k: float(v) for k, v in data["hardware"].items()})
        sh = data.get("shapes", {})
        model: Any = data.get("model")
        if not isinstance(model, str) or model == "custom" or not sh:
            model = ModelPreset(
                f"calibrated-{cal.stem.replace('ep_cost_model_', '')}",
                int(sh["experts"]),
                int(sh["top_k"]),
                int(sh["hidden"]),
                int(sh["ffn"]),
            )
        label = (
            f"Measured cost model from `{cal.name}`: {data.get('device')}, {data.get('dtype')}, "
            f"shapes {sh}, fit r2 {data.get('fit', {}).get('forward', {}).get('r2')}; link bandwidth "
            f"{data.get('link_bandwidth_source', 'as recorded')}"
        )
        runs.append((cal.stem, label, hw, model))
    for tag, label, hw, model in runs:
        experts = MODELS[model].experts if isinstance(model, str) else model.experts
        # pct:n needs n < E: a small calibrated model skips the scenarios it cannot hold
        scen = ("balanced",) + tuple(s for s in PAPER_SCENARIOS if int(s.split(":")[1]) < experts)
        res = simulate(
            model, devices, tokens, scenarios=scen, real=real, routing_dir=folder, hardware=hw, progress=progress
        )
        name = model if isinstance(model, str) else model.name
        lines += [
            f"### {label}",
            "",
            f"Hardware: FLOP/s {hw.device_flops:.3g}, link {hw.link_bandwidth:.3g} B/s, GEMM overhead "
            f"{hw.gemm_overhead:.3g} s, {hw.dtype_bytes:g} bytes per value; scenarios on {name}.",
            "",
            "Paper scenarios:",
            "",
            _sim_tables(res, real=False),
            "",
        ]
        if real:
            lines += [
                "Recorded routing (all layers summed; imbalance = median over layers):",
                "",
                _sim_tables(res, real=True),
                "",
            ]
        ps = res.plot(assets, prefix=f"simulate_{tag}")
        plots += ps
        lines += [f"![{p.stem}]({p.parent.name}/{p.name})" for p in ps] + [""]
    if not calibrations:
        missing["calibration"] = f"not yet run: {INPUTS['calibration'].command} (measured cost model)"
        lines += [
            f"Measured cost model: not yet run: `{INPUTS['calibration'].command}` (on the GPU: "
            "`python benchmarks/ep_layer.py --mode calibrate --model gpt-oss-120b --devices 8 --tokens 32768`)",
            "",
        ]
    return "\n".join(lines), plots, missing


# ---- 4. study ----------------------------------------------------------------------------------------------
def _study_section(data: dict[str, Any], assets: Path, source: str) -> tuple[str, list[Path]]:
    from .study import plot_study, render_markdown

    plots = plot_study(data, assets, prefix="balancer_study")
    md = render_markdown(data, [f"{assets.name}/{p.name}" for p in plots])
    md = md.replace("## Balancer training study", "## 4. Balancer training study", 1)
    return md.replace("\n\n", f"\n\nSource: `{source}`{' (quick run)' if 'quick' in source else ''}.\n\n", 1), plots


# ---- the report --------------------------------------------------------------------------------------------
def build_report(
    out: str | Path = DEFAULT_OUT,
    *,
    results_dir: str | Path | None = None,
    routing_dir: str | Path | None = None,
    cost_model: str | Path | None = None,
    run_quick: bool = False,
    devices: int = 8,
    tokens_per_device: int = 32768,
    progress: bool = True,
) -> ReportResult:
    """Write the Markdown report to ``out`` and its plots to ``<out stem>_files/``; see the module docstring.

    Args:
      out: the report's path (``.md``; default ``moebalance_results/report.md`` under the current directory).
      results_dir: where the benchmarks wrote their JSON (default ``benchmarks/results`` under the current
        directory, then the report's own folder; neither is created).
      routing_dir: the recorded routing data (default ``DEFAULT_ROUTING_DIR`` of the simulator).
      cost_model: a calibration JSON (``benchmarks/ep_layer.py --mode calibrate``); default every
        ``ep_cost_model_*.json`` in ``results_dir``.
      run_quick: run the quick training study first when its JSON is missing (into the plots folder).
      devices, tokens_per_device: the simulator's P and tokens per device.
    """
    out = Path(out)
    if out.suffix.lower() != ".md":
        raise ValueError(f"`out` must be a .md path, got {str(out)!r}")
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"`devices` must be an integer >= 1, got {devices!r}")
    if isinstance(tokens_per_device, bool) or not isinstance(tokens_per_device, int) or tokens_per_device < 1:
        raise ValueError(f"`tokens_per_device` must be an integer >= 1, got {tokens_per_device!r}")
    results = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS
    if results_dir is not None and not results.is_dir():
        raise ValueError(f"`results_dir` {str(results)!r} is not a folder")
    assets = out.parent / f"{out.stem}_files"
    assets.mkdir(parents=True, exist_ok=True)
    folders = [results, assets] if results_dir is not None else [results, out.parent, assets]

    found: dict[str, list[Path]] = {}
    missing: dict[str, str] = {}
    for name in INPUTS:
        if name == "calibration" and cost_model is not None:
            cm = Path(cost_model)
            if not cm.is_file():
                raise ValueError(f"`cost_model` {str(cm)!r} is not a file")
            found[name] = [cm]
            continue
        hits = _find(name, folders, quick=False) or _find(name, folders, quick=True)
        if not hits and run_quick and name == "study":
            _quick_study(assets, progress)
            hits = _find(name, [assets], quick=True)
        if hits:
            found[name] = hits if name == "calibration" else hits[:1]
        elif name != "calibration":
            missing[name] = f"not yet run: {INPUTS[name].command} (quick: {INPUTS[name].quick_command})"

    sections: list[str] = []
    plots: list[Path] = []
    for name, title in (("routing", "## 1. Routing solvers"), ("placement", "## 2. Placement")):
        if name not in found:
            sections.append(f"{title}\n\n{missing[name]}.\n")
            continue
        src = found[name][0]
        try:
            data = _read_json(src)
            if name == "routing":
                tgt = results / "routing_solvers_target.json"
                text, ps = _routing_section(data, _read_json(tgt) if tgt.is_file() else None, assets, _rel(src, out))
            else:
                text, ps = _placement_section(data, assets, _rel(src, out))
        except (KeyError, TypeError, ValueError) as exc:
            text, ps = f"{title}\n\nCould not read `{src}`: {exc!r}\n", []
            missing[name] = f"unreadable: {src}"
        sections.append(text)
        plots += ps
    text, ps, sim_missing = _simulate_section(
        Path(routing_dir) if routing_dir is not None else None,
        found.get("calibration", []),
        assets,
        devices=devices,
        tokens=tokens_per_device,
        progress=progress,
    )
    sections.append(text)
    plots += ps
    missing.update(sim_missing)
    if "study" in found:
        src = found["study"][0]
        try:
            text, ps = _study_section(_read_json(src), assets, _rel(src, out))
        except (KeyError, TypeError, ValueError) as exc:
            text, ps = f"## 4. Balancer training study\n\nCould not read `{src}`: {exc!r}\n", []
            missing["study"] = f"unreadable: {src}"
        sections.append(text)
        plots += ps
    else:
        sections.append(f"## 4. Balancer training study\n\n{missing['study']}.\n")

    head = [
        "# moebalance report",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
        f"on {platform.node() or '?'} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores), Python "
        f"{platform.python_version()}. Every number below was measured on the machine named in its section; "
        "hardware figures of the simulator are assumptions unless a section says 'measured'.",
        "",
        "Inputs: "
        + (", ".join(f"{k}: " + ", ".join(f"`{_rel(p, out)}`" for p in v) for k, v in found.items()) or "none")
        + ".",
        "",
    ]
    if missing:
        head += ["Missing inputs:", ""] + [f"- {k}: {v}" for k, v in missing.items()] + [""]
    markdown = "\n".join(head + sections).rstrip() + "\n"
    out.write_text(markdown, encoding="utf-8")
    return ReportResult(out, plots, {k: [str(p) for p in v] for k, v in found.items()}, missing, markdown)


def _rel(path: Path, out: Path) -> str:
    try:
        return os.path.relpath(path, out.parent)
    except ValueError:
        return str(path)


# ---- command line ------------------------------------------------------------------------------------------
def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help=f"the report (.md); plots go to <stem>_files/ beside it (default {DEFAULT_OUT} under the "
        "current directory)",
    )
    p.add_argument(
        "--results",
        default=None,
        help=f"folder of the benchmark JSON files (default {DEFAULT_RESULTS} under the current "
        "directory where it exists, then the report's folder)",
    )
    p.add_argument(
        "--routing-data",
        default=None,
        help="folder of the recorded routing data (default: $MOEBALANCE_ROUTING_DATA or ../shared/data/routing)",
    )
    p.add_argument(
        "--cost-model",
        default=None,
        help="calibration JSON of benchmarks/ep_layer.py --mode calibrate (default: ep_cost_model_*.json "
        "in the results folder)",
    )
    p.add_argument(
        "--run-quick",
        action="store_true",
        help="when the study's JSON is missing, run the quick study first (in this process, into the "
        "plots folder); the benchmark scripts are never run",
    )
    p.add_argument("--devices", type=int, default=8, help="simulated devices P")
    p.add_argument("--tokens-per-device", type=int, default=32768, help="simulated tokens per device")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_report_command(args: argparse.Namespace) -> int:
    """Build the report from parsed arguments and print where it went and what was missing."""
    res = build_report(
        args.out,
        results_dir=args.results,
        routing_dir=args.routing_data,
        cost_model=args.cost_model,
        run_quick=args.run_quick,
        devices=args.devices,
        tokens_per_device=args.tokens_per_device,
        progress=not args.no_progress,
    )
    for name, why in res.missing.items():
        print(f"missing {name}: {why}")
    print(f"wrote {res.path} ({len(res.plots)} plots in {res.path.parent / (res.path.stem + '_files')})")
    return 0


def add_report_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to an argparse ``subparsers``; it sets ``func`` to run it (returns 0)."""
    p = subparsers.add_parser(
        "report",
        help="collect every benchmark into one Markdown report with PNG plots",
        description="Collect the routing-solver benchmark, the placement gap table, the simulator's speedup and "
        "peak-memory curves (assumed hardware and, where a calibration file exists, the measured cost "
        "model; paper scenarios and recorded routing) and the balancer training study into one "
        "Markdown report with its PNG plots. Missing inputs are named with the command that makes "
        "them; --run-quick runs the quick training study first.",
    )
    _add_arguments(p)
    p.set_defaults(func=run_report_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m moebalance.evaluation.report``: errors are one line on stderr, exit status 2."""
    p = argparse.ArgumentParser(prog="moebalance report", description=(__doc__ or "").splitlines()[0])
    _add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_report_command(args)
    except (ValueError, OSError) as exc:
        print(f"moebalance report: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
