"""GPU suite: merge the sections' JSON parts into one JSON and one Markdown report, with the targets computed.

``gpu_suite.sh`` runs this after every step (so a run cut short still leaves a report of what finished):

    python benchmarks/gpu_report.py --work WORKDIR --out-dir DIR --slug nvidia-h200 [--suffix S] [--dry-run]

reads ``WORKDIR/<section>.json`` (env, kernels, layer, bip, calibration, ep), ``WORKDIR/pytest.xml`` (JUnit XML of the
``gpu``-marked tests) and ``WORKDIR/steps.jsonl`` (one line per step: name, rc, wall and timeout seconds), and
writes ``DIR/gpu_suite_<slug><suffix>.json`` and ``.md``.

Targets, each computed per case it applies to, from numbers measured side by side in one run:

- ``fwd_vs_dense``: Triton forward TFLOP/s >= 60% of the dense matmul's, at E = 8, balanced routing;
- ``fwd_vs_loop``: Triton forward >= 1.5x faster than the per-expert loop, at E >= 64 (every k and routing);
- ``bwd_vs_dense``: Triton backward TFLOP/s >= 50% of the dense matmul's backward, at E = 8, balanced.

``met`` is ``value >= threshold`` and the Triton result within its tolerance of the float32 reference.
In a dry run the thresholds are computed the same way (E >= 64 becomes the dry grid's largest E) but every
status reads "dry run: not a measurement"; nothing is claimed.
"""

from __future__ import annotations

import argparse
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

__all__ = ["SECTIONS", "TARGETS", "compute_targets", "build", "render_markdown", "main"]

SECTIONS = ("env", "kernels", "layer", "bip", "calibration", "ep")
TARGETS = {
    "fwd_vs_dense": {
        "text": "Triton forward >= 60% of dense TFLOP/s at E=8, balanced",
        "threshold": 0.60,
        "field": "triton_fwd_share_of_dense",
    },
    "fwd_vs_loop": {
        "text": "Triton forward >= 1.5x the per-expert loop at E>=64",
        "threshold": 1.5,
        "field": "triton_fwd_speedup_vs_loop",
    },
    "bwd_vs_dense": {
        "text": "Triton backward >= 50% of dense TFLOP/s at E=8, balanced",
        "threshold": 0.50,
        "field": "triton_bwd_share_of_dense",
    },
}
LARGE_E = 64
SMALL_E = 8


def compute_targets(kernels: dict[str, Any] | None, dry: bool) -> list[dict[str, Any]]:
    """One entry per (target, case it applies to); see the module docstring."""
    if not kernels:
        return [
            {
                "target": k,
                "text": t["text"],
                "threshold": t["threshold"],
                "case": None,
                "value": None,
                "met": None,
                "status": "unmeasured (no kernels section)",
            }
            for k, t in TARGETS.items()
        ]
    rows = kernels.get("rows", [])
    experts = [r["experts"] for r in rows]
    large = LARGE_E if not dry else max(experts, default=LARGE_E)
    out = []
    for key, t in TARGETS.items():
        if key == "fwd_vs_loop":
            cases = [r for r in rows if r["experts"] >= large]
        else:
            cases = [r for r in rows if r["experts"] == SMALL_E and r["routing"] == "balanced"]
        if not cases:
            out.append(
                {
                    "target": key,
                    "text": t["text"],
                    "threshold": t["threshold"],
                    "case": None,
                    "value": None,
                    "met": None,
                    "status": "unmeasured (no case in the grid)",
                }
            )
        for r in cases:
            v = r.get(t["field"])
            ok = bool(r.get("triton_correct"))
            met = None if v is None else bool(v >= t["threshold"] and ok)
            if dry:
                status = "dry run: not a measurement"
            elif v is None:
                status = "unmeasured"
            elif not ok:
                status = "not met (Triton result outside tolerance)"
            else:
                status = "met" if met else "not met"
            out.append(
                {
                    "target": key,
                    "text": t["text"],
                    "threshold": t["threshold"],
                    "case": {"experts": r["experts"], "k": r["k"], "routing": r["routing"], "tokens": r["tokens"]},
                    "applies_to": f"E >= {large}" if key == "fwd_vs_loop" else f"E = {SMALL_E}, balanced",
                    "value": v,
                    "triton_correct": ok,
                    "met": met,
                    "status": status,
                }
            )
    return out


def _pytest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable JUnit XML: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped_reasons = [], {}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            sk = case.find("skipped")
            if sk is not None:
                reason = (sk.get("message") or "")[:120]
                skipped_reasons[reason] = skipped_reasons.get(reason, 0) + 1
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    return {**tot, "failed": failed, "skipped_reasons": skipped_reasons}


def build(work: Path, slug: str, dry: bool) -> dict[str, Any]:
    parts = {}
    for s in SECTIONS:
        p = work / f"{s}.json"
        if p.is_file():
            try:
                parts[s] = json.loads(p.read_text(encoding="utf-8"))
            except ValueError as exc:
                parts[s] = {"error": f"unreadable part: {exc}"}
    steps = []
    sp = work / "steps.jsonl"
    if sp.is_file():
        steps = [json.loads(line) for line in sp.read_text(encoding="utf-8").splitlines() if line.strip()]
    env = parts.get("env", {})
    dev = env.get("device") or next(
        (v.get("device") for v in parts.values() if isinstance(v, dict) and v.get("device")), {}
    )
    missing = []
    pk = env.get("packages", {})
    for name in ("ortools", "cvxpy", "highspy"):
        if pk and pk.get(name) is None:
            missing.append(f"{name} not installed: its solvers are left out (carry wheels to include them)")
    cal = parts.get("calibration", {})
    for m, why in (cal.get("methods_missing_backend") or {}).items():
        missing.append(f"placement method {m!r} left out of the simulator: {why}")
    for s in SECTIONS:
        if s not in parts:
            missing.append(f"section {s!r} produced no results (see steps and the log)")
        elif parts[s].get("complete") is False:
            done = (
                f": {len(parts[s].get('rows', []))} of {parts[s]['cases_planned']} cases measured"
                if "cases_planned" in parts[s]
                else ""
            )
            missing.append(f"section {s!r} stopped before its end{done}")
    return {
        "suite": "gpu_suite",
        "version": 1,
        "dry_run": dry,
        "measured_on_gpu": (not dry) and dev.get("device_type") == "cuda",
        "device_slug": slug,
        "device": dev,
        "note": (
            "DRY RUN on a CPU (Triton interpreter, tiny shapes, float32): the numbers check the plumbing "
            "and are not measurements; no target is claimed"
        )
        if dry
        else "measured in one run on the device named above; see each section's settings",
        "steps": steps,
        "pytest_gpu": _pytest(work / "pytest.xml"),
        **{s: parts.get(s) for s in SECTIONS},
        "targets": compute_targets(parts.get("kernels"), dry),
        "missing": missing,
    }


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".3g", scale: float = 1.0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, float)):
        return format(v * scale, spec)
    return str(v)


def _ms(d: Any) -> str:
    return _f(d.get("median_ms"), ".3f") if isinstance(d, dict) else "-"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(res: dict[str, Any]) -> str:
    dev = res.get("device") or {}
    L = [f"# GPU suite: {dev.get('name', '?')} ({res['device_slug']})", ""]
    if res["dry_run"]:
        L += [f"> **{res['note']}**", ""]
    L += [
        f"torch {dev.get('torch')}, triton {dev.get('triton')}, CUDA {dev.get('cuda')}, python {dev.get('python')}"
        + (
            f", capability {dev['capability']}, {dev.get('multiprocessors')} SMs, {dev.get('memory_gib')} GiB"
            if dev.get("capability")
            else ""
        ),
        "",
    ]
    L += (
        ["## Steps", ""]
        + _table(
            ["step", "rc", "wall s", "timeout s"],
            [[s["name"], str(s["rc"]), _f(s.get("wall_s"), ".1f"), str(s.get("timeout_s"))] for s in res["steps"]],
        )
        + [""]
    )
    L += (
        ["## Targets", ""]
        + _table(
            ["target", "case", "value", "threshold", "status"],
            [
                [
                    t["text"],
                    "-" if not t["case"] else f"E={t['case']['experts']} k={t['case']['k']} {t['case']['routing']}",
                    _f(t["value"], ".3f"),
                    str(t["threshold"]),
                    t["status"],
                ]
                for t in res["targets"]
            ],
        )
        + [""]
    )
    env = res.get("env")
    if env and "ceilings" in env:
        c = env["ceilings"]
        L += [
            "## Ceilings (measured in this run)",
            "",
            f"- device copy: {_f(c['copy']['bytes_per_s'], '.3g', 1e-9)} GB/s (bytes read + written, "
            f"{c['copy']['bytes_read_plus_written'] / 2**30:.2f} GiB per copy)",
            f"- dense matmul {c['matmul']['n']}^3 {env.get('dtype')}: {_f(c['matmul']['tflops'], '.1f')} TFLOP/s",
            "- packages: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in env.get("packages", {}).items()),
            "",
        ]
    pt = res.get("pytest_gpu")
    if pt:
        L += [
            "## gpu-marked tests",
            "",
            f"{pt.get('passed')} passed, {pt.get('failures')} failed, "
            f"{pt.get('errors')} errors, {pt.get('skipped')} skipped of {pt.get('tests')}"
            + ("; failed: " + ", ".join(pt["failed"]) if pt.get("failed") else ""),
            "",
        ]
    k = res.get("kernels")
    if k and "rows" in k:
        s = k["settings"]
        L += [
            "## Kernels",
            "",
            f"T={s['tokens']} tokens, hidden={s['hidden']}, ffn={s['ffn']}, {s['dtype']}, "
            f"median of {s['repeats']} after {s['warmup']} warm-up ({k.get('timing')}); times in ms",
            "",
        ]
        body = []
        for r in k["rows"]:
            m = r["methods"]
            cell = lambda name, ph, m=m: _ms(m.get(name, {}).get(ph))  # noqa: E731
            body.append(
                [
                    str(r["experts"]),
                    str(r["k"]),
                    r["routing"],
                    _f(r.get("hot_share"), ".2f"),
                    cell("triton", "fwd"),
                    cell("triton", "bwd"),
                    cell("torch_loop", "fwd"),
                    cell("torch_loop", "bwd"),
                    cell("torch_grouped_mm", "fwd"),
                    cell("dense", "fwd"),
                    cell("dense", "bwd"),
                    _f(m.get("triton", {}).get("fwd_tflops"), ".1f"),
                    _f(r.get("triton_fwd_share_of_dense"), ".2f"),
                    _f(r.get("triton_bwd_share_of_dense"), ".2f"),
                    _f(r.get("triton_fwd_speedup_vs_loop"), ".2f"),
                    _f(r.get("triton_bwd_speedup_vs_loop"), ".2f"),
                    ("yes" if r["triton_correct"] else "NO") + (f" ERROR {r['error']}" if "error" in r else ""),
                ]
            )
        L += _table(
            [
                "E",
                "k",
                "routing",
                "hot share",
                "triton fwd",
                "triton bwd",
                "loop fwd",
                "loop bwd",
                "grouped_mm fwd",
                "dense fwd",
                "dense bwd",
                "triton fwd TFLOP/s",
                "fwd/dense",
                "bwd/dense",
                "fwd x loop",
                "bwd x loop",
                "correct",
            ],
            body,
        ) + [""]
    ly = res.get("layer")
    if ly and "rows" in ly:
        s = ly["settings"]
        L += [
            "## MoELayer with each balancer",
            "",
            f"T={s['tokens']}, hidden={s['hidden']}, ffn={s['ffn']}, "
            f"E={s['experts']}, k={s['top_k']}, {s['dtype']}; ms",
            "",
        ]
        L += _table(
            ["balancer", "backend", "eval fwd", "train step", "vs none", "max_vio first -> last", "triton vs torch"],
            [
                [
                    r["balancer"],
                    r["backend"],
                    _ms(r.get("eval_fwd")),
                    _ms(r.get("train_step")),
                    _f(r.get("train_step_vs_none"), ".2f"),
                    f"{_f(r.get('max_vio_first_step'), '.2f')} -> {_f(r.get('max_vio_last_step'), '.2f')}",
                    _f(r.get("eval_rel_diff_triton_vs_torch"), ".1e")
                    + (f" ERROR {r['error']}" if "error" in r else ""),
                ]
                for r in ly["rows"]
            ],
        ) + [""]
    bp = res.get("bip")
    if bp and "rows" in bp:
        L += [
            "## BIP balancer step (benchmarks/bip_balancer.py)",
            "",
            f"T={bp['T']}, E={bp['E']}, k={bp['k']}, device {bp['device']}, {bp['batches'] - bp['burn_in']} "
            f"batches after {bp['burn_in']} of burn-in, warm-started; medians"
            + (f". {bp['note']}" if bp.get("note") else ""),
            "",
        ]
        L += _table(
            [
                "iterations",
                "step ms",
                "certified gap median",
                "gap max",
                "max load / capacity",
                "fast cold ms",
                "fast warm ms",
            ],
            [
                [
                    str(r["iterations"]),
                    _f(r.get("step_s"), ".3f", 1e3),
                    _f(r.get("gap_median"), ".2e"),
                    _f(r.get("gap_max"), ".2e"),
                    _f(r.get("max_load_ratio_median"), ".3f"),
                    _f(r.get("fast_cold_s"), ".2f", 1e3),
                    _f(r.get("fast_warm_s"), ".2f", 1e3),
                ]
                for r in bp["rows"]
            ],
        ) + [""]
    cal = res.get("calibration")
    if cal and "fit_forward" in cal:
        f, hw, cp = cal["fit_forward"], cal["hardware_measured"], cal["copy"]
        s = cal["settings"]
        L += [
            "## Cost model calibration and simulator",
            "",
            f"{s['model']} experts (hidden={s['hidden']}, ffn={s['ffn']}), {s['dtype']}. Forward fit "
            f"t = token_time * rows + gemm_time * GEMMs: token_time {_f(f['token_time'], '.3e')} s, gemm_time "
            f"{_f(f['gemm_time'], '.3e')} s, R^2 {_f(f['r2'], '.4f')} over {f['samples']} workloads -> "
            f"device_flops {_f(hw['device_flops'], '.3e')} FLOP/s ({cal.get('device_flops_source')}), "
            f"gemm_overhead {_f(hw['gemm_overhead'], '.3e')} s.",
            f"Weight copies ({cp['experts']} experts, {cp['payload_bytes'] / 2**20:.1f} MiB): device-to-device "
            f"{_f(cp['device_to_device'].get('bytes_per_s'), '.3g', 1e-9)} GB/s, host-to-device "
            f"{_f(cp['host_to_device_pinned'].get('bytes_per_s'), '.3g', 1e-9)} GB/s, device-to-host "
            f"{_f(cp['device_to_host_pinned'].get('bytes_per_s'), '.3g', 1e-9)} GB/s. "
            f"Link bandwidth: {cal['link_bandwidth_source']}.",
            "",
        ]
        sim = [r for r in cal["simulator"] if r["method"] in ("llep", "llep+", "eplb")]
        meas = {r["scenario"]: r.get("llep_speedup_measured_compute") for r in cal.get("measured_makespans", [])}
        L += _table(
            [
                "scenario",
                "method",
                "speedup (assumed hw)",
                "speedup (measured hw)",
                "measured compute speedup",
                "paper Fig.4",
            ],
            [
                [
                    r["scenario"],
                    r["method"],
                    _f(r["speedup_assumed_hw"], ".2f"),
                    _f(r["speedup_measured_hw"], ".2f"),
                    _f(meas.get(r["scenario"]), ".2f") if r["method"] == "llep" else "",
                    "-" if not r["paper_fig4_range"] else f"{r['paper_fig4_range'][0]}-{r['paper_fig4_range'][1]}",
                ]
                for r in sim
            ],
        ) + [""]
    ep = res.get("ep")
    if ep and "rows" in ep:
        s = ep["settings"]
        L += [
            "## Expert parallelism, world size 1",
            "",
            f"{ep['backend']}, T={s['tokens']}, hidden={s['hidden']}, "
            f"ffn={s['ffn']}, E={s['experts']}, k={s['top_k']}, {s['dtype']}; single-device layer: fwd "
            f"{_ms(ep['layer']['fwd'])} ms, fwd+bwd {_ms(ep['layer']['fwd_bwd'])} ms",
            "",
        ]
        L += _table(
            ["placement", "fwd ms", "fwd+bwd ms", "vs layer", "out diff", "dx diff"],
            [
                [
                    r["placement"],
                    _ms(r.get("fwd")),
                    _ms(r.get("fwd_bwd")),
                    _f(r.get("fwd_bwd_vs_layer"), ".2f"),
                    _f(r.get("out_rel_diff_vs_layer"), ".1e"),
                    _f(r.get("dx_rel_diff_vs_layer"), ".1e") + (f" ERROR {r['error']}" if "error" in r else ""),
                ]
                for r in ep["rows"]
            ],
        ) + [""]
    if res["missing"]:
        L += ["## Left out", ""] + [f"- {m}" for m in res["missing"]] + [""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--slug", required=True)
    p.add_argument("--suffix", default="")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    res = build(args.work, args.slug, args.dry_run)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"gpu_suite_{args.slug}{args.suffix}"
    Path(f"{stem}.json").write_text(json.dumps(res, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(render_markdown(res), encoding="utf-8")
    print(f"report: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
