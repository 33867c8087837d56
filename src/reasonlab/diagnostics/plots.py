"""Plots for report.md and compare.md. matplotlib through the Agg canvas directly (no pyplot): no display needed, no
global backend switched in the caller's process, no figures left open.

Each function draws one PNG from run folders and returns its path, or None when the runs logged nothing it shows.
Non-finite values are drawn as a red vertical line at the first step they appear (a NaN loss must be visible, not a
gap). Gradient norms go on a log axis where an exact zero is drawn as an 'x' on the bottom edge.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from reasonlab.diagnostics.runfolder import HELD_OUT, RunFolder

SPLIT_COLORS = {"val": "tab:blue", "test": "tab:red", "train": "tab:gray"}


def _figure(n_axes: int = 1, width: float = 7.0, height: float = 3.2) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height * n_axes), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(n_axes, 1, i + 1) for i in range(n_axes)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _finite(steps: list[int], vals: list[float]) -> tuple[list[int], list[float], int | None]:
    """Points with finite values, and the first step with a non-finite one (None if none)."""
    bad = next((s for s, v in zip(steps, vals) if not math.isfinite(v)), None)
    keep = [(s, v) for s, v in zip(steps, vals) if math.isfinite(v)]
    return [s for s, _ in keep], [v for _, v in keep], bad


def _lines(ax, rf: RunFolder, keys: list[str], label_prefix: str = "", style: str = "-", **kw) -> bool:
    """One line per key; a red dotted vertical line where a key first went NaN/inf. True if anything was drawn."""
    drew = False
    for k in keys:
        s, v, bad = _finite(*rf.series(k))
        if s:
            if style == "-" and len(s) < 30 and "marker" not in kw:  # sparse series: show the points
                kw = {**kw, "marker": "."}
            ax.plot(s, v, style, label=f"{label_prefix}{k}", **kw)
            drew = True
        if bad is not None:
            ax.axvline(bad, color="red", linestyle=":", linewidth=1.5, label=f"{label_prefix}{k} NaN/inf")
            drew = True
    return drew


def _finish(ax, title: str, ylabel: str, legend: bool = True, logy: bool = False, outside: bool = False) -> None:
    """Title, labels, grid, legend. `outside`: the legend right of the axes, for plots whose many lines leave no
    corner free (inside, "best" still covers data)."""
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        if outside:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        else:
            ax.legend(fontsize=7, loc="best")


# ----------------------------------------------------------------------------------------------------- single run


def plot_loss(rf: RunFolder, path: Path) -> Path | None:
    keys = [k for k in rf.keys() if k.startswith("train/") and "loss" in k]
    terms = rf.keys_matching(r"^loss/term/")
    if not keys and not terms:
        return None
    fig, axes = _figure(2 if terms else 1)
    _lines(axes[0], rf, keys)
    vals = [v for k in keys for v in rf.series(k)[1] if math.isfinite(v)]
    wide = bool(vals) and min(vals) > 0 and max(vals) / min(vals) > 1e3  # a divergence: only a log axis shows both
    _finish(axes[0], "training loss", "loss", logy=wide)
    if terms:  # weighted term values w_i * L_i, logged at gradient audits
        _lines(axes[1], rf, terms, style="o-", markersize=3)
        _finish(axes[1], "weighted loss terms (values; compare gradients in grad_terms.png)", "w * L")
    return _save(fig, path)


def plot_reward(rf: RunFolder, path: Path) -> Path | None:
    s, mean, _ = _finite(*rf.series("rollout/reward_mean"))
    zs, zero, _ = _finite(*rf.series("rollout/frac_zero_std"))
    if not s and not zs:
        return None
    fig, axes = _figure(2 if zs and s else 1)
    ax = axes[0]
    if s:
        std = dict(zip(*rf.series("rollout/reward_std")))
        ax.plot(s, mean, label="rollout/reward_mean")
        if std:  # band: +- the mean within-group std
            lo = [m - std.get(t, 0.0) for t, m in zip(s, mean)]
            hi = [m + std.get(t, 0.0) for t, m in zip(s, mean)]
            ax.fill_between(s, lo, hi, alpha=0.2, label="+- rollout/reward_std (within group)")
        _finish(ax, "reward", "reward")
        ax = axes[-1]
    if zs:
        ax.plot(zs, zero, color="tab:orange", label="rollout/frac_zero_std")
        ax.set_ylim(-0.05, 1.05)
        _finish(ax, "groups with identical rewards (zero advantage, zero gradient)", "fraction")
    return _save(fig, path)


def plot_accuracy(rf: RunFolder, path: Path) -> Path | None:
    """Primary metric of every eval (not controls) vs step, per split, with its 95% CI as a band; train/acc too."""
    fig, axes = _figure(1)
    ax = axes[0]
    drew = False
    for split in ("train", *HELD_OUT):
        pts = []
        for e in rf.evals_for(split):
            p = e.primary
            if p is None or e.step is None:
                continue
            m = p[1]
            lo = m["lo"] if m.get("lo") is not None else m["value"]
            hi = m["hi"] if m.get("hi") is not None else m["value"]
            pts.append((e.step, float(m["value"]), lo, hi, m.get("n"), p[0]))
        if not pts:
            continue
        pts.sort()
        s, v, lo, hi = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], [p[3] for p in pts]
        c = SPLIT_COLORS.get(split)
        label = f"{split} {pts[-1][5]} (n={pts[-1][4]})"
        if len(pts) == 1:  # a band over one step has no width: the interval as an error bar
            ax.errorbar(s, v, yerr=[[v[0] - lo[0]], [hi[0] - v[0]]], fmt="o", color=c, capsize=4, label=label)
        else:  # the title says what the bands are; the legend lists only what is drawn as a line
            ax.plot(s, v, "o-", color=c, label=label)
            ax.fill_between(s, lo, hi, color=c, alpha=0.2, linewidth=0)
        drew = True
    for k in ("train/exact_accuracy", "train/acc", "train/accuracy"):
        if _lines(ax, rf, [k], color="tab:gray", alpha=0.6, linewidth=1):
            drew = True
            break
    if not drew:
        return None
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "accuracy (bands and bars: 95% CI)", "accuracy")
    return _save(fig, path)


def plot_ratio(rf: RunFolder, path: Path, explode: float = 5.0) -> Path | None:
    keys = [k for k in ("ppo/ratio_first_mean", "ppo/ratio_mean", "ppo/ratio_max") if rf.series(k)[0]]
    clip = rf.series("ppo/clip_frac")[0]
    if not keys and not clip:
        return None
    fig, axes = _figure(2 if keys and clip else 1)
    if keys:
        ax = axes[0]
        _lines(ax, rf, keys)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="1 (pi_theta = pi_old)")
        ax.axhline(explode, color="red", linewidth=0.8, linestyle="--", label=f"explosion threshold {explode:g}")
        _finish(ax, "PPO importance ratio (first minibatch of a fresh rollout must be exactly 1)", "ratio",
                logy=True)
    if clip:
        ax = axes[-1]
        _lines(ax, rf, ["ppo/clip_frac"] + (["ppo/approx_kl"] if rf.series("ppo/approx_kl")[0] else []))
        _finish(ax, "clip fraction / approx KL", "value")
    return _save(fig, path)


def plot_grad_terms(rf: RunFolder, path: Path) -> Path | None:
    """Per-term gradient norms (log axis; exact zeros as 'x' on the bottom edge) and, per term, the mean share of the
    loss VALUE next to the mean share of the GRADIENT."""
    terms = [k[len("grad/term/"):] for k in rf.keys_matching(r"^grad/term/")]
    modules = rf.keys_matching(r"^grad/module/")
    if not terms and not modules:
        return None
    fig, axes = _figure(2 if terms else 1, width=9.5)  # room for the legends right of the axes
    ax = axes[0]
    positive = [v for t in terms for v in rf.series(f"grad/term/{t}")[1] if math.isfinite(v) and v > 0]
    floor = min(positive) / 100 if positive else 1e-12
    for t in terms:
        s, v, _ = _finite(*rf.series(f"grad/term/{t}"))
        line = ax.plot(s, [max(x, floor) for x in v], "o-", markersize=3, label=f"grad/term/{t}")[0]
        zeros = [st for st, x in zip(s, v) if x <= 0]
        if zeros:
            ax.plot(zeros, [floor] * len(zeros), "x", color=line.get_color(), markersize=9,
                    label=f"{t}: exactly 0 (no gradient)")
    _lines(ax, rf, modules, style="--")
    _finish(ax, "gradient norm each weighted loss term sends to the trainable parameters", "L2 norm", logy=True,
            outside=True)
    if terms:
        ax = axes[1]
        vs = [_mean(rf.series(f"share/loss/{t}")[1]) for t in terms]
        gs = [_mean(rf.series(f"share/grad/{t}")[1]) for t in terms]
        x = list(range(len(terms)))
        ax.bar([i - 0.2 for i in x], vs, width=0.4, label="share of loss value")
        ax.bar([i + 0.2 for i in x], gs, width=0.4, label="share of gradient")
        ax.set_xticks(x, terms, fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title("value share vs gradient share (mean over audits)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else 0.0


ENCODER_PANELS = (("encoder/pairwise_cos", "mean pairwise cosine (~1: same code for every input)", False),
                  ("encoder/cross_sample_ratio", "cross-sample variance / total (~0: collapse)", True),
                  ("encoder/token_std", "std over tokens within a sample", False),
                  ("encoder/output_norm", "mean token L2 norm", False))


def plot_encoder(rf: RunFolder, path: Path) -> Path | None:
    panels = [p for p in ENCODER_PANELS if rf.series(p[0])[0]]
    if not panels and not rf.series("encoder/cross_sample_var")[0]:
        return None
    panels = panels or [("encoder/cross_sample_var", "cross-sample variance", True)]
    fig, axes = _figure(len(panels), height=2.4)
    for ax, (key, title, logy) in zip(axes, panels):
        _lines(ax, rf, [key])
        _finish(ax, title, key.split("/")[-1], legend=False, logy=logy)
    return _save(fig, path)


ROLLOUT_KEYS = ("rollout/unique_ratio", "rollout/unique_answer_ratio", "rollout/repeat_ngram_rate",
                "rollout/invalid_rate")


def plot_rollout(rf: RunFolder, path: Path) -> Path | None:
    shares = [k for k in ROLLOUT_KEYS if rf.series(k)[0]]
    other = [k for k in ("rollout/max_char_run", "rollout/entropy") if rf.series(k)[0]]
    if not shares and not other:
        return None
    fig, axes = _figure((1 if shares else 0) + len(other), height=2.4)
    i = 0
    if shares:
        _lines(axes[0], rf, shares)
        axes[0].set_ylim(-0.05, 1.05)
        _finish(axes[0], "rollout diversity and repetition", "fraction")
        i = 1
    for ax, key in zip(axes[i:], other):
        _lines(ax, rf, [key])
        _finish(ax, {"rollout/max_char_run": "longest single-character run in a rollout",
                     "rollout/entropy": "policy entropy (nats/token)"}[key], key.split("/")[-1], legend=False)
    return _save(fig, path)


def run_plots(rf: RunFolder, out_dir: Path, ratio_explode: float = 5.0) -> tuple[dict[str, Path], dict[str, str]]:
    """Every plot this run has data for: ({name: path}, {name: error}). A plot that fails is reported, not raised:
    a recipe calls this at the end of training and must not lose the run to a drawing bug."""
    makers = {"loss": lambda p: plot_loss(rf, p), "reward": lambda p: plot_reward(rf, p),
              "accuracy": lambda p: plot_accuracy(rf, p), "ratio": lambda p: plot_ratio(rf, p, ratio_explode),
              "grad_terms": lambda p: plot_grad_terms(rf, p), "encoder": lambda p: plot_encoder(rf, p),
              "rollout": lambda p: plot_rollout(rf, p)}
    made, errors = {}, {}
    for name, make in makers.items():
        try:
            path = make(out_dir / f"{name}.png")
        except Exception as e:  # noqa: BLE001 (reported in report.md)
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        if path is not None:
            made[name] = path
    return made, errors


# ----------------------------------------------------------------------------------------------------- several runs


def overlay_metric(runs: list[tuple[str, RunFolder]], key: str, path: Path, title: str) -> Path | None:
    fig, axes = _figure(1)
    drew = False
    for label, rf in runs:
        drew |= _lines(axes[0], rf, [key], label_prefix=f"{label}: ")
    if not drew:
        return None
    _finish(axes[0], title, key)
    return _save(fig, path)


def overlay_accuracy(runs: list[tuple[str, RunFolder]], path: Path) -> Path | None:
    """Held-out primary metric per run (solid: val, dashed: test) with 95% CI bands."""
    fig, axes = _figure(1)
    ax = axes[0]
    drew = False
    for i, (label, rf) in enumerate(runs):
        color = f"C{i % 10}"
        for split, style in (("val", "o-"), ("test", "s--")):
            pts = sorted((e.step, e.primary[1]) for e in rf.evals_for(split) if e.primary and e.step is not None)
            if not pts:
                continue
            s = [p[0] for p in pts]
            v = [float(p[1]["value"]) for p in pts]
            ax.plot(s, v, style, color=color, label=f"{label} {split} (n={pts[-1][1].get('n')})")
            lo = [p[1]["lo"] if p[1].get("lo") is not None else p[1]["value"] for p in pts]
            hi = [p[1]["hi"] if p[1].get("hi") is not None else p[1]["value"] for p in pts]
            ax.fill_between(s, lo, hi, color=color, alpha=0.15)
            drew = True
    if not drew:
        return None
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "held-out accuracy per run (bands: 95% CI)", "accuracy")
    return _save(fig, path)
