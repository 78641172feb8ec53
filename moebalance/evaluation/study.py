"""The balancer training study: one small byte-level MoE language model trained once per balancer.

For every configuration (``num_experts`` x ``top_k``) and every balancer (``none``, ``aux_loss:<coeff>``,
``loss_free:<u>``, ``bip``, ``bip_same_batch``) it trains :class:`moebalance.integrations.lm.MoELM` on CPU on the
bytes of the Python standard library's source files (found offline through ``sysconfig``), from the same
initial weights and the same batches, and records:

- per step: the training cross-entropy (without the auxiliary loss) and AvgMaxVio, the mean over the MoE layers
  of the batch MaxVio ``(max_e load_e - mean load) / mean load``;
- at the end: SupMaxVio (the largest AvgMaxVio over all steps), MaxVio_global (per layer over all validation
  tokens at once, then the mean over layers, as arXiv 2408.15664 measures it), validation perplexity, wall and
  CPU time.

``moebalance study`` (and ``benchmarks/balancer_study.py``) runs it, prints a table and writes JSON, a
Markdown summary with the comparison to the two papers, and PNG plots. Torch and matplotlib are imported by
the functions that need them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moebalance._machine import cpu_name

__all__ = [
    "StudyConfig",
    "StudyResult",
    "BALANCER_SPECS",
    "DEFAULT_BALANCERS",
    "parse_balancer",
    "stdlib_corpus",
    "run_study",
    "noise_floor",
    "discussion",
    "render_table",
    "render_markdown",
    "plot_study",
    "write_outputs",
    "config_from_args",
    "run_study_command",
    "add_study_command",
    "main",
]

# where `moebalance study` writes unless --out says otherwise: a folder of its own under the current directory
# (benchmarks/balancer_study.py passes the checkout's benchmarks/results)
DEFAULT_OUT = "moebalance_results"

DEFAULT_BALANCERS: tuple[str, ...] = (
    "none",
    "aux_loss:0.01",
    "aux_loss:0.1",
    "loss_free:0.001",
    "bip",
    "bip_same_batch",
)
BALANCER_SPECS = "none | aux_loss:<coeff> | loss_free:<u> | bip | bip_same_batch"
# the numbers the two papers report, for the comparison (see `discussion`)
PAPER_2408_15664 = {"loss_free_max_vio_global": 0.04, "aux_loss_max_vio_global": (0.5, 0.7)}


# ---- corpus ------------------------------------------------------------------------------------------------
def _split_of(rel: str, val_every: int) -> str:
    return "val" if zlib.crc32(rel.encode()) % val_every == 0 else "train"


def stdlib_corpus(
    train_bytes: int, val_bytes: int, *, root: str | Path | None = None, val_every: int = 10
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Bytes of the standard library's ``*.py`` files: ``(train [N] uint8, val [M] uint8, info)``.

    Deterministic: every file (outside site-packages and __pycache__) goes to validation when the CRC-32 of
    its relative path is divisible by ``val_every``, else to training, so a file never lands in both; within a
    split, files are taken in the order of that CRC (then path) until the split has its bytes (the last file
    cut). ``root`` defaults to ``sysconfig.get_paths()["stdlib"]``. ``info`` records the root, the Python
    version, the file counts and a SHA-256 of each split (the corpus changes with the Python version).
    """
    for name, v in (("train_bytes", train_bytes), ("val_bytes", val_bytes), ("val_every", val_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "val_every" else 1):
            raise ValueError(f"`{name}` must be an integer >= {2 if name == 'val_every' else 1}, got {v!r}")
    base = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise ValueError(f"`root` must be a folder of Python sources, got {str(base)!r}")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    rels = sorted(
        p.relative_to(base).as_posix()
        for p in base.rglob("*.py")
        if p.is_file() and not skip & set(p.relative_to(base).parts)
    )
    if not rels:
        raise ValueError(f"`root` {str(base)!r} holds no .py files")
    rels.sort(key=lambda r: (zlib.crc32(r.encode()), r))
    want = {"train": train_bytes, "val": val_bytes}
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    have = {"train": 0, "val": 0}
    for rel in rels:
        split = _split_of(rel, val_every)
        if have[split] >= want[split]:
            if all(have[s] >= want[s] for s in want):
                break
            continue
        data = (base / rel).read_bytes()[: want[split] - have[split]]
        parts[split].append(data)
        have[split] += len(data)
    for split in want:
        if have[split] < 2:
            raise ValueError(f"the {split} split of {str(base)!r} is empty")
    arrays = {s: np.frombuffer(b"".join(parts[s]), dtype=np.uint8).copy() for s in want}
    info = {
        "root": str(base),
        "python": platform.python_version(),
        "files_seen": len(rels),
        "val_every": val_every,
        **{f"{s}_files": len(parts[s]) for s in want},
        **{f"{s}_bytes": int(arrays[s].size) for s in want},
        **{f"{s}_sha256": hashlib.sha256(arrays[s].tobytes()).hexdigest() for s in want},
    }
    return arrays["train"], arrays["val"], info


# ---- configuration -----------------------------------------------------------------------------------------
def parse_balancer(spec: str) -> tuple[str, dict[str, Any]]:
    """``(label, LMConfig overrides)`` of a balancer spec (:data:`BALANCER_SPECS`), e.g. ``"aux_loss:0.1"``."""
    name, _, arg = str(spec).partition(":")
    try:
        value = float(arg) if arg else None
    except ValueError:
        value = None
        arg = "?" + arg
    if name in ("none", "bip", "bip_same_batch") and not arg:
        if name == "bip_same_batch":
            return name, {"balancer": "bip"}  # the paper's algorithm: MoEConfig's "bip"
        if name == "bip":  # this study's "bip" label is the lagged variant (prices of the batches before)
            return name, {"balancer": "bip_lagged"}
        return name, {"balancer": name}
    if name == "aux_loss" and value is not None and math.isfinite(value) and value >= 0:
        return f"aux_loss({value:g})", {"balancer": "aux_loss", "aux_loss_coeff": value}
    if name == "loss_free" and value is not None and math.isfinite(value) and value > 0:
        return f"loss_free(u={value:g})", {"balancer": "loss_free", "bias_update_rate": value}
    raise ValueError(f"`balancer` must look like {BALANCER_SPECS}, got {spec!r}")


@dataclasses.dataclass
class StudyConfig:
    """Settings of the study (defaults: the full study, about 13 minutes of CPU time on one core).

    Grid: ``experts`` x ``top_k`` x ``balancers`` (specs, :data:`BALANCER_SPECS`). Model: ``d_model``,
    ``n_layers``, ``n_heads``, ``router``, ``expert_ffn`` (None: ``4 * d_model / k``, the active width stays
    fixed). Training: ``steps`` of AdamW on ``batch_size`` windows of ``seq_len`` bytes (``batch_size * seq_len``
    tokens per MoE layer and step), ``lr`` with ``warmup`` linear steps then cosine decay to ``lr / 10``, gradient
    clipping at 1, ``seed`` (the same initial weights and batches for every balancer of one configuration).
    Data: ``train_bytes`` and ``val_bytes`` of the corpus, ``val_tokens`` scored for perplexity and
    MaxVio_global, ``stdlib`` (None: this Python's). ``threads``: torch threads (1 by default: on a busy
    machine spinning threads cost more than they give on matrices this small).
    """

    experts: tuple[int, ...] = (16, 64)
    top_k: tuple[int, ...] = (2, 8)
    balancers: tuple[str, ...] = DEFAULT_BALANCERS
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    router: str = "softmax"
    expert_ffn: int | None = None
    steps: int = 250
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 20
    seed: int = 0
    train_bytes: int = 8 << 20
    val_bytes: int = 1 << 20
    val_tokens: int = 65536
    stdlib: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        self.experts = tuple(self.experts)
        self.top_k = tuple(self.top_k)
        self.balancers = tuple(self.balancers)
        for name in ("experts", "top_k", "balancers"):
            if not getattr(self, name):
                raise ValueError(f"`{name}` must not be empty")
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "steps",
            "batch_size",
            "seq_len",
            "train_bytes",
            "val_bytes",
            "val_tokens",
            "threads",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"`warmup` must be an integer >= 0, got {self.warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive number, got {self.lr!r}")
        for E in self.experts:
            for k in self.top_k:
                if isinstance(E, bool) or not isinstance(E, int) or not isinstance(k, int) or not 1 <= k <= E:
                    raise ValueError(f"`experts` and `top_k` must be integers with 1 <= k <= E, got E={E!r}, k={k!r}")
        for spec in self.balancers:
            parse_balancer(spec)
        if self.val_tokens < self.seq_len:
            raise ValueError(f"`val_tokens` must be >= seq_len={self.seq_len}, got {self.val_tokens}")
        if self.val_bytes <= self.val_tokens:
            raise ValueError(f"`val_bytes` must exceed val_tokens={self.val_tokens}, got {self.val_bytes}")
        if self.train_bytes <= self.seq_len:
            raise ValueError(f"`train_bytes` must exceed seq_len={self.seq_len}, got {self.train_bytes}")
        self.lm_config(self.experts[0], self.top_k[0], {"balancer": "none"})  # model fields, LMConfig's checks

    @classmethod
    def quick(cls, **overrides: Any) -> StudyConfig:
        """A smoke-test size (seconds): tiny model, a few steps, every balancer, both k, 8 and 16 experts."""
        base: dict[str, Any] = dict(
            experts=(8, 16),
            top_k=(2,),
            d_model=32,
            n_layers=1,
            n_heads=2,
            steps=12,
            batch_size=4,
            seq_len=32,
            warmup=2,
            train_bytes=1 << 16,
            val_bytes=1 << 13,
            val_tokens=1024,
        )
        base.update(overrides)
        return cls(**base)

    def lm_config(self, E: int, k: int, overrides: dict[str, Any]) -> Any:
        from moebalance.integrations.lm import LMConfig

        return LMConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            max_seq_len=self.seq_len,
            num_experts=E,
            top_k=k,
            expert_ffn=self.expert_ffn,
            router=self.router,
            **overrides,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }


# ---- training ----------------------------------------------------------------------------------------------
def _lr_at(step: int, cfg: StudyConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def noise_floor(tokens: int, E: int, k: int, *, draws: int = 64, seed: int = 0) -> float:
    """Mean MaxVio of ``tokens`` tokens that each pick ``k`` distinct experts uniformly at random.

    A router that is balanced only in expectation cannot do better on a batch of that size; it tells sampling
    noise from imbalance.
    """
    rng = np.random.default_rng(seed)
    mean = tokens * k / E
    out = []
    for _ in range(draws):
        pick = np.argpartition(rng.random((tokens, E)), k - 1, axis=1)[:, :k]
        loads = np.bincount(pick.ravel(), minlength=E)
        out.append((loads.max() - mean) / mean)
    return float(np.mean(out))


def _evaluate(model: Any, val: Any, cfg: StudyConfig) -> dict[str, float]:
    """Validation loss, perplexity and MaxVio_global over ``val_tokens`` tokens in contiguous windows."""
    import torch

    S = cfg.seq_len
    n = min(cfg.val_tokens // S, (val.numel() - 1) // S)
    windows = torch.arange(n) * S
    model.eval()
    total, count, loads = 0.0, 0, None
    with torch.no_grad():
        for start in range(0, n, cfg.batch_size):
            offs = windows[start : start + cfg.batch_size]
            idx = torch.stack([val[o : o + S + 1] for o in offs.tolist()]).long()
            loss = model.loss(idx[:, :-1], idx[:, 1:])
            total += float(loss) * idx[:, 1:].numel()
            count += idx[:, 1:].numel()
            batch = model.loads()
            loads = batch if loads is None else loads + batch
    model.train()
    assert loads is not None  # val_bytes > val_tokens >= seq_len (StudyConfig): at least one window
    mean = loads.sum(1, keepdim=True) / loads.shape[1]
    per_layer = ((loads.max(1, keepdim=True).values - mean) / mean).squeeze(1)
    val_loss = total / count
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "max_vio_global": float(per_layer.mean()),
        "max_vio_global_layers": per_layer.tolist(),
        "val_tokens": count,
    }


def _train_one(cfg: StudyConfig, E: int, k: int, spec: str, train: Any, val: Any, bar: Any) -> dict[str, Any]:
    import torch

    from moebalance.integrations.lm import MoELM

    label, overrides = parse_balancer(spec)
    lm_cfg = cfg.lm_config(E, k, overrides)
    torch.manual_seed(cfg.seed * 1_000_003 + E * 101 + k)  # same weights for every balancer of (E, k)
    model = MoELM(lm_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)  # same batches for every run
    S, B = cfg.seq_len, cfg.batch_size
    loss_hist: list[float] = []
    vio_hist: list[float] = []
    vio_layers: list[list[float]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        offs = torch.randint(0, train.numel() - S - 1, (B,), generator=gen)
        idx = torch.stack([train[o : o + S + 1] for o in offs.tolist()]).long()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        (loss + model.aux_loss()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        vio = model.max_vio()
        loss_hist.append(float(loss.detach()))
        vio_layers.append(vio.tolist())
        vio_hist.append(float(vio.mean()))
        if not math.isfinite(loss_hist[-1]):
            raise ValueError(f"training diverged (loss {loss_hist[-1]}) for E={E}, k={k}, {label}; lower `lr`")
        bar.update(1)
        bar.set_postfix_str(f"E={E} k={k} {label} loss={loss_hist[-1]:.3f} AvgMaxVio={vio_hist[-1]:.2f}")
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    ev = _evaluate(model, val, cfg)
    tail = max(1, cfg.steps // 10)
    head = min(10, cfg.steps)
    return {
        "experts": E,
        "top_k": k,
        "balancer": label,
        "spec": spec,
        "ffn": lm_cfg.ffn,
        "params": sum(p.numel() for p in model.parameters()),
        "loss": loss_hist,
        "avg_max_vio": vio_hist,
        "max_vio_layers": vio_layers,
        "final_train_loss": float(np.mean(loss_hist[-tail:])),
        "avg_max_vio_mean": float(np.mean(vio_hist)),
        "avg_max_vio_first10": float(np.mean(vio_hist[:head])),
        "avg_max_vio_last": float(np.mean(vio_hist[-tail:])),
        "sup_max_vio": float(np.max(vio_hist)),
        "sup_max_vio_after_step0": float(np.max(vio_hist[1:])) if len(vio_hist) > 1 else None,
        **ev,
        "train_wall_s": train_wall,
        "train_cpu_s": train_cpu,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "bias_final": [m.bias.tolist() for m in model.moe_layers],
    }


@dataclasses.dataclass
class StudyResult:
    """Runs of the study (one dict per configuration and balancer; keys in :func:`_train_one`), the settings,
    the corpus description, the noise floors and the machine."""

    runs: list[dict[str, Any]]
    settings: dict[str, Any]
    corpus: dict[str, Any]
    noise: dict[str, dict[str, float]]
    machine: dict[str, Any]
    total_wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyResult:
        try:
            return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a balancer-study result: missing {exc}") from None

    def table(self) -> str:
        return render_table(self.to_dict())

    __str__ = table

    def plot(self, out_dir: str | Path, prefix: str = "balancer_study") -> list[Path]:
        return plot_study(self.to_dict(), out_dir, prefix)


def _machine() -> dict[str, Any]:
    import os

    cpu = cpu_name()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    import torch

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def run_study(config: StudyConfig | None = None, *, progress: bool = True) -> StudyResult:
    """Train every (configuration, balancer) of ``config`` (default: the full study) and collect the results."""
    import torch
    from tqdm.auto import tqdm

    cfg = config if config is not None else StudyConfig()
    if not isinstance(cfg, StudyConfig):
        raise ValueError(f"`config` must be a StudyConfig, got {type(cfg).__name__}")
    t0 = time.perf_counter()
    machine = _machine()
    train_np, val_np, corpus = stdlib_corpus(cfg.train_bytes, cfg.val_bytes, root=cfg.stdlib)
    train, val = torch.from_numpy(train_np), torch.from_numpy(val_np)
    if train.numel() <= cfg.seq_len + 1 or val.numel() <= cfg.seq_len + 1:
        raise ValueError(f"the corpus is too small for seq_len={cfg.seq_len}")
    grid = [(E, k, b) for E in cfg.experts for k in cfg.top_k for b in cfg.balancers]
    T = cfg.batch_size * cfg.seq_len
    noise = {
        f"E={E},k={k}": {"batch": noise_floor(T, E, k), "validation": noise_floor(cfg.val_tokens, E, k, draws=16)}
        for E in cfg.experts
        for k in cfg.top_k
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    runs = []
    try:
        with tqdm(
            total=len(grid) * cfg.steps, desc="balancer study", unit="step", disable=not progress, dynamic_ncols=True
        ) as bar:
            for E, k, spec in grid:
                runs.append(_train_one(cfg, E, k, spec, train, val, bar))
    finally:
        torch.set_num_threads(threads)
    settings = {**cfg.to_dict(), "tokens_per_step": T}
    return StudyResult(runs, settings, corpus, noise, machine, time.perf_counter() - t0)


# ---- output ------------------------------------------------------------------------------------------------
def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_table(result: dict[str, Any]) -> str:
    """Markdown table of the runs of a study result (its dict form)."""
    head = [
        "E",
        "k",
        "balancer",
        "train loss",
        "val ppl",
        "AvgMaxVio (mean)",
        "first 10 steps",
        "last 10%",
        "SupMaxVio",
        "MaxVio_global",
        "wall s",
        "cpu s",
    ]
    rows = []
    for r in result["runs"]:
        rows.append(
            [
                str(r["experts"]),
                str(r["top_k"]),
                r["balancer"],
                f"{r['final_train_loss']:.3f}",
                f"{r['val_ppl']:.3f}",
                f"{r['avg_max_vio_mean']:.3f}",
                f"{r['avg_max_vio_first10']:.3f}",
                f"{r['avg_max_vio_last']:.3f}",
                f"{r['sup_max_vio']:.3f}",
                f"{r['max_vio_global']:.3f}",
                f"{r['wall_s']:.0f}",
                f"{r['cpu_s']:.0f}",
            ]
        )
    return _md_table(head, rows)


def _by_config(result: dict[str, Any]) -> dict[tuple[int, int], dict[str, dict[str, Any]]]:
    out: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    for r in result["runs"]:
        out.setdefault((r["experts"], r["top_k"]), {})[r["balancer"]] = r
    return out


def _smooth(y: Sequence[float], w: int) -> np.ndarray:
    v = np.asarray(y, dtype=np.float64)
    if w <= 1 or v.size < w:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v)
    out[w - 1 :] = (c[w:] - c[:-w]) / w
    out[: w - 1] = c[1:w] / np.arange(1, w)
    return out


def plot_study(result: dict[str, Any], out_dir: str | Path, prefix: str = "balancer_study") -> list[Path]:
    """PNG plots: AvgMaxVio against step and training loss against step, one panel per (E, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._plotting import finish, style

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _by_config(result)
    keys = sorted(groups)
    ncol = min(2, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    paths = []
    for what, ylabel, fname, smooth in (
        ("avg_max_vio", "AvgMaxVio (batch, mean over layers)", "maxvio", 1),
        ("loss", "training loss (nats/byte, 10-step mean)", "loss", 10),
    ):
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 4.0 * nrow), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            n = len(groups[key])
            for j, (label, r) in enumerate(groups[key].items()):
                y = _smooth(r[what], smooth)
                # markers at staggered steps, so curves that lie on each other stay visible
                every = max(1, len(y) // 12)
                ax.plot(np.arange(len(y)), y, **style(j, markevery=(round(j * every / n) % every, every)), label=label)
            E, k = key
            if what == "loss":  # the first steps dwarf the differences between balancers: zoom on the rest
                ys = np.concatenate([_smooth(r[what], smooth)[len(r[what]) // 5 :] for r in groups[key].values()])
                if ys.size:
                    lo, hi = float(ys.min()), float(ys.max())
                    ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.3 * (hi - lo + 1e-9))
            if what == "avg_max_vio":
                floor = result.get("noise", {}).get(f"E={E},k={k}", {}).get("batch")
                if floor:
                    ax.axhline(floor, color="gray", ls="--", lw=0.9, label="uniform-random floor")
                ax.set_yscale("log")
            ax.set_title(f"E={E}, top-{k}")
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.set_visible(False)
        paths.append(finish(fig, out_dir / f"{prefix}_{fname}.png"))
    return paths


def _pick(runs: dict[str, dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for name, r in runs.items() if name.startswith(prefix)]


def discussion(result: dict[str, Any]) -> str:
    """Markdown: our numbers next to what arXiv 2408.15664 and arXiv 2502.15451 report, with the verdicts."""
    groups = _by_config(result)
    lines = [
        "#### Against arXiv 2408.15664 (Loss-Free Balancing)",
        "",
        "The paper reports MaxVio_global of about 0.04 for loss-free balancing against about 0.5-0.7 for "
        "the auxiliary loss (1B and 3B models, sigmoid gate, validation set), and a lower perplexity for "
        "loss-free.",
        "",
    ]
    agree_vio = agree_ppl = n_lf = 0
    for (E, k), runs in sorted(groups.items()):
        lf = _pick(runs, "loss_free")
        aux = _pick(runs, "aux_loss")
        if not lf or not aux:
            continue
        n_lf += 1
        lf0 = lf[0]
        floor = result.get("noise", {}).get(f"E={E},k={k}", {}).get("validation")
        aux_txt = ", ".join(f"{a['balancer']} {a['max_vio_global']:.3f}" for a in aux)
        better = all(lf0["max_vio_global"] < a["max_vio_global"] for a in aux)
        ppl_better = all(lf0["val_ppl"] <= a["val_ppl"] for a in aux)
        agree_vio += better
        agree_ppl += ppl_better
        lines.append(
            f"- E={E}, top-{k}: MaxVio_global {lf0['balancer']} {lf0['max_vio_global']:.3f} vs {aux_txt}"
            + (f" (uniform-random floor for {result['settings']['val_tokens']} tokens: {floor:.3f})" if floor else "")
            + f"; val ppl {lf0['val_ppl']:.3f} vs "
            + ", ".join(f"{a['val_ppl']:.3f}" for a in aux)
            + f". Loss-free is {'lower' if better else 'not lower'} in MaxVio_global and "
            f"{'not worse' if ppl_better else 'worse'} in perplexity."
        )
    if n_lf:
        lines += [
            "",
            f"Ordering (loss-free more balanced than every auxiliary-loss run): agrees in {agree_vio} of "
            f"{n_lf} configurations; perplexity (loss-free not worse): {agree_ppl} of {n_lf}. The absolute "
            "values are not comparable with the paper's: models of "
            f"{min(r['params'] for r in result['runs']) / 1e6:.2f}-"
            f"{max(r['params'] for r in result['runs']) / 1e6:.2f}M parameters trained "
            f"for {result['settings']['steps']} steps of {result['settings']['tokens_per_step']} tokens, "
            f"on bytes, with a {result['settings']['router']} router; MaxVio_global here is measured on "
            f"{result['settings']['val_tokens']} validation tokens, so sampling noise alone sets the "
            "floor quoted beside each line.",
        ]
    lines += [
        "",
        "#### Against arXiv 2502.15451 (BIP-based balancing)",
        "",
        "The paper claims balance on every layer from the first training step to the last (lowest "
        "AvgMaxVio and SupMaxVio) and the lowest perplexity among the loss-controlled, loss-free and BIP "
        "methods (16- and 64-expert models).",
        "",
    ]
    n_bip = sup_best = ppl_best = first_ok = n_same = 0
    for (E, k), runs in sorted(groups.items()):
        bips = _pick(runs, "bip")
        if not bips:
            continue
        n_bip += 1
        floor = result.get("noise", {}).get(f"E={E},k={k}", {}).get("batch")
        parts = []
        for b in bips:
            v = b["avg_max_vio"]
            step1 = v[1] if len(v) > 1 else float("nan")
            parts.append(
                f"{b['balancer']}: AvgMaxVio step 0 {v[0]:.3f}, step 1 {step1:.3f},"
                f" first 10 steps {b['avg_max_vio_first10']:.3f}, SupMaxVio {b['sup_max_vio']:.3f}, "
                f"MaxVio_global {b['max_vio_global']:.3f}"
            )
            if b["balancer"] == "bip_same_batch" and floor:
                first_ok += v[0] <= 2 * floor
                n_same += 1
        others = {n: r for n, r in runs.items() if not n.startswith("bip")}
        best_bip_sup = min(b["sup_max_vio"] for b in bips)
        best_other_sup = min((r["sup_max_vio"] for r in others.values()), default=float("inf"))
        best_bip_ppl = min(b["val_ppl"] for b in bips)
        best_other_ppl = min((r["val_ppl"] for r in others.values()), default=float("inf"))
        sup_best += best_bip_sup < best_other_sup
        ppl_best += best_bip_ppl <= best_other_ppl
        lf = _pick(runs, "loss_free")
        lf_txt = (
            (
                f"; {lf[0]['balancer']}: step 0 {lf[0]['avg_max_vio'][0]:.3f}, first 10 steps "
                f"{lf[0]['avg_max_vio_first10']:.3f}, SupMaxVio {lf[0]['sup_max_vio']:.3f}"
            )
            if lf
            else ""
        )
        lines.append(
            f"- E={E}, top-{k}: "
            + "; ".join(parts)
            + lf_txt
            + (f" (uniform-random batch floor {floor:.3f})" if floor else "")
            + f". Best val ppl: BIP {best_bip_ppl:.3f} vs others {best_other_ppl:.3f}."
        )
    if n_bip:
        lines += [
            "",
            f"A BIP run has the lowest SupMaxVio in {sup_best} of {n_bip} configurations and the lowest "
            f"perplexity in {ppl_best} of {n_bip}. `bip` is the layer as built: its prices are updated "
            "after each forward, so step 0 routes with zero prices (exactly as `none` does) and every "
            "later batch routes with the prices solved on the batch before, so it balances only as well "
            "as one batch predicts the next. `bip_same_batch` solves the prices on the batch itself "
            "before routing it, "
            "as the paper does, and is the run that tests the 'balanced from the first step' claim.",
        ]
        if n_same:
            lines += [
                "",
                f"`bip_same_batch` routes step 0 within twice the uniform-random batch floor in {first_ok} "
                f"of {n_same} configurations. Its MaxVio_global is measured in evaluation, where no "
                "batch is priced on itself: the layer routes with the prices of the last training batch, "
                "so that number shows how well a batch's prices carry over to other text.",
            ]
    return "\n".join(lines)


def render_markdown(result: dict[str, Any], plots: Sequence[str | Path] = ()) -> str:
    """The study's Markdown section: settings, the table, the plots and the comparison with the papers."""
    s, c, m = result["settings"], result["corpus"], result["machine"]
    lines = [
        "## Balancer training study",
        "",
        f"Byte-level decoder-only MoE LM (`moebalance.integrations.lm.MoELM`): d_model {s['d_model']}, "
        f"{s['n_layers']} layers, {s['n_heads']} heads, {s['router']} router, dropless; {s['steps']} steps of "
        f"{s['batch_size']} x {s['seq_len']} bytes ({s['tokens_per_step']} tokens per MoE layer and step), "
        f"AdamW lr {s['lr']:g}, seed {s['seed']}. Corpus: Python {c['python']} standard library, "
        f"{c['train_files']} training files ({c['train_bytes']} bytes), {c['val_files']} validation files "
        f"({c['val_bytes']} bytes; {s['val_tokens']} tokens scored). Machine: {m['cpu']}, {m['cores']} cores, "
        f"torch {m['torch']}, {s['threads']} thread(s); load average at start "
        f"{', '.join(f'{x:.1f}' for x in m.get('load_average_at_start') or []) or '?'} "
        f"(wall times are under that load; cpu s is the process's CPU time). "
        f"Total {result['total_wall_s']:.0f} s.",
        "",
        "AvgMaxVio: mean over MoE layers of the batch MaxVio ((max load - mean load) / mean load); the table "
        "gives its mean over all steps, over the first 10 steps and over the last 10% of steps. SupMaxVio: "
        "its largest value over all steps. MaxVio_global: per layer over all validation tokens at once, then "
        "the mean over layers. Uniform-random floors (mean MaxVio when every token picks k experts at "
        "random): "
        + ", ".join(
            f"{key}: batch {v['batch']:.3f}, validation {v['validation']:.3f}"
            for key, v in result.get("noise", {}).items()
        )
        + ".",
        "",
        render_table(result),
        "",
    ]
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).as_posix()})", ""]
    lines += [discussion(result), ""]
    return "\n".join(lines)


def write_outputs(result: StudyResult, out_dir: str | Path, name: str = "balancer_study") -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and the two PNG plots into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{name}.json"
    js.write_text(result.to_json(indent=1) + "\n", encoding="utf-8")
    plots = result.plot(out, prefix=name)
    md = out / f"{name}.md"
    md.write_text(render_markdown(result.to_dict(), [p.name for p in plots]), encoding="utf-8")
    return [js, md, *plots]


# ---- command line ------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _add_arguments(p: argparse.ArgumentParser, default_out: str) -> None:
    # the defaults as declared: building a StudyConfig would check the model fields, which imports torch
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(StudyConfig)})
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds); other flags override them")
    p.add_argument("--experts", type=_ints, default=None, help=f"numbers of experts (default {d.experts})")
    p.add_argument("--top-k", type=_ints, default=None, help=f"experts per token (default {d.top_k})")
    p.add_argument(
        "--balancers", default=None, help=f"comma-separated specs: {BALANCER_SPECS} (default {','.join(d.balancers)})"
    )
    for name, typ, help_ in (
        ("steps", int, "training steps per run"),
        ("batch-size", int, "sequences per step"),
        ("seq-len", int, "bytes per sequence"),
        ("d-model", int, "model width"),
        ("layers", int, "transformer blocks (one MoE layer each)"),
        ("heads", int, "attention heads"),
        ("expert-ffn", int, "inner width of one expert"),
        ("lr", float, "peak learning rate"),
        ("seed", int, "seed of weights and batches"),
        ("val-tokens", int, "validation tokens scored"),
        ("threads", int, "torch threads"),
    ):
        attr = {"layers": "n_layers", "heads": "n_heads"}.get(name, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=typ, default=None, help=f"{help_} (default {getattr(d, attr)})")
    p.add_argument("--router", choices=("softmax", "sigmoid"), default=None, help="router (default softmax)")
    p.add_argument("--stdlib", default=None, help="folder of Python sources (default: this Python's stdlib)")
    p.add_argument(
        "--out",
        default=default_out,
        help=f"folder for balancer_study.json/.md and the PNG plots (default {default_out}"
        f"{'' if os.path.isabs(default_out) else ' under the current directory'})",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """A :class:`StudyConfig` from parsed arguments (``--quick`` sizes, then each given flag)."""
    over: dict[str, Any] = {}
    for flag, attr in (
        ("experts", "experts"),
        ("top_k", "top_k"),
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("seq_len", "seq_len"),
        ("d_model", "d_model"),
        ("layers", "n_layers"),
        ("heads", "n_heads"),
        ("expert_ffn", "expert_ffn"),
        ("lr", "lr"),
        ("seed", "seed"),
        ("val_tokens", "val_tokens"),
        ("threads", "threads"),
        ("router", "router"),
        ("stdlib", "stdlib"),
    ):
        v = getattr(args, flag)
        if v is not None:
            over[attr] = v
    if args.balancers is not None:
        over["balancers"] = tuple(b.strip() for b in args.balancers.split(",") if b.strip())
    if "val_tokens" in over:  # keep the validation split large enough for what is scored
        base = StudyConfig.quick() if args.quick else StudyConfig()
        over.setdefault("val_bytes", max(base.val_bytes, 2 * over["val_tokens"]))
    return StudyConfig.quick(**over) if args.quick else StudyConfig(**over)


def run_study_command(args: argparse.Namespace) -> int:
    """Run the study from parsed arguments: print the table, write the outputs (``_quick`` names for --quick)."""
    cfg = config_from_args(args)
    result = run_study(cfg, progress=not args.no_progress)
    print(result.table())
    print()
    print(discussion(result.to_dict()))
    for path in write_outputs(result, args.out, "balancer_study_quick" if args.quick else "balancer_study"):
        print(f"wrote {path}")
    return 0


def add_study_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``study`` subcommand to an argparse ``subparsers``; it sets ``func`` to run it (returns 0)."""
    p = subparsers.add_parser(
        "study",
        help="train a small byte-level MoE LM once per balancer and compare balance and perplexity",
        description="The balancer training study: a small decoder-only MoE language model trained on CPU on the "
        "bytes of the Python standard library, once per balancer (none, aux_loss 0.01 and 0.1, "
        "loss_free u=1e-3, bip, bip_same_batch) for 16 and 64 experts, top-2 and top-8. Records "
        "training loss and AvgMaxVio per step, SupMaxVio, MaxVio_global, validation perplexity and "
        "time; prints a table and writes JSON, Markdown and PNG plots.",
    )
    _add_arguments(p, DEFAULT_OUT)
    p.set_defaults(func=run_study_command)
    return p


def main(argv: Sequence[str] | None = None, *, default_out: str = "benchmarks/results") -> int:
    """Entry point of ``benchmarks/balancer_study.py``: errors are one line on stderr, exit status 2."""
    p = argparse.ArgumentParser(prog="balancer_study", description=(__doc__ or "").splitlines()[0])
    _add_arguments(p, default_out)
    args = p.parse_args(argv)
    try:
        return run_study_command(args)
    except (ValueError, OSError) as exc:
        print(f"balancer_study: error: {exc}", file=sys.stderr)
        return 2
