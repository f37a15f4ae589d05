"""PNG figures of the weight-shift analysis: pooled L-inf histograms, per-layer profiles, ROC, mitigation maps.

Why these choices:

* ``matplotlib.figure.Figure`` with the Agg canvas directly, never ``pyplot``: no global backend switch, no
  figure registry to leak across a long analysis run, safe in threads and on headless machines. The studies'
  reports draw the same way and save through :func:`save_figure`.
* Histograms use common edges from the pooled 0.5-99.5 % range (the seed hard-coded ranges for one model and
  dropped what fell outside) and show the share of columns per bin, so groups pooling different numbers of
  adapters compare.
* Profiles show the mean across seeds with a t interval (:func:`jaxpoison.eval.stats.seed_summary`): the
  band is the uncertainty over seeds, the unit of replication.
* Mitigation heatmaps put attack and capability side by side on the factors actually applied, s_B rows
  descending as in the seed, every cell annotated.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxpoison.eval.stats import seed_summary

PALETTE = ("#86D3DE", "#BCBD46", "#D9822B", "#7A5195", "#4C72B0", "#C44E52", "#55A868")


def save_figure(fig: Figure, path, dpi: int = 150) -> str:
    """Render ``fig`` on an Agg canvas to ``path`` (the format from its suffix), cropped to its content;
    returns the path as a string. Every jaxpoison figure is saved here."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return str(path)


def linf_histograms(pooled: Mapping[str, Mapping[str, np.ndarray]], path, bins: int = 40,
                    title: str = "") -> str:
    """Seed 003's figure: pooled per-column L-inf norms of LoRA A and B, one step histogram per group.

    ``pooled`` maps a group label ("0 %", "clean", ...) to ``{"a": values, "b": values}`` (any shape)."""
    fig = Figure(figsize=(10, 3.6))
    for ax, factor, name in zip(fig.subplots(1, 2), ("a", "b"), ("LoRA A", "LoRA B")):
        values = {g: np.ravel(v[factor]) for g, v in pooled.items()}
        lo, hi = np.quantile(np.concatenate(list(values.values())), [0.005, 0.995])
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-12, bins + 1)
        for (group, v), color in zip(values.items(), PALETTE):
            ax.hist(v, edges, weights=np.full(v.size, 1.0 / max(v.size, 1)), histtype="step", lw=1.8,
                    color=color, label=f"{group} (n={v.size})")
        ax.set(title=f"{name} max norm per column", xlabel="L-inf norm", ylabel="share of columns")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def layer_profiles(feats: Mapping[str, np.ndarray], groups: Sequence, path, keys: Optional[Sequence[str]] = None,
                   confidence: float = 0.95) -> str:
    """One panel per feature key ([V, L] arrays): per group, the mean over its variants (seeds) per layer with
    a t-interval band."""
    groups = np.asarray(groups)
    keys = [k for k in (keys or feats) if np.ndim(feats[k]) == 2]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        value = np.asarray(feats[key], float)
        layers = np.arange(value.shape[1])
        for group, color in zip(dict.fromkeys(groups.tolist()), PALETTE):
            sel = value[groups == group].T  # [L, n]
            s = seed_summary(sel, confidence) if sel.shape[1] > 1 else None
            mean = sel.mean(1)
            ax.plot(layers, mean, color=color, label=f"{group} (n={sel.shape[1]})")
            if s is not None:
                ax.fill_between(layers, s.low, s.high, color=color, alpha=0.25, lw=0)
        ax.set(title=key, xlabel="layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return save_figure(fig, path)


def roc_plot(curves: Mapping[str, tuple], path, title: str = "Poisoned-adapter detection") -> str:
    """ROC curves: ``{label: (fpr, tpr, auc)}`` (auc may be None), with the chance diagonal."""
    fig = Figure(figsize=(4.6, 4.4))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    for (label, (fpr, tpr, auc)), color in zip(curves.items(), PALETTE):
        ax.plot(fpr, tpr, color=color, lw=2,  # straight segments: a run of tied scores is a diagonal
                label=label if auc is None else f"{label} (AUC {auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (clean flagged)",
           ylabel="true positive rate (poisoned flagged)", title=title)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def mitigation_heatmaps(s_a, s_b, attack, capability, path, attack_label: str = "attack effect (ASR)",
                        capability_label: str = "general capability", attack_lower_is_better: bool = True) -> str:
    """Attack and capability over the (s_A, s_B) grid side by side; ``attack``, ``capability`` [len(s_a),
    len(s_b)] (e.g. from :func:`jaxpoison.analysis.mitigation.as_heatmap`). The best cell of each is bold."""
    s_a, s_b = np.asarray(s_a, float), np.asarray(s_b, float)
    fig = Figure(figsize=(10, 4))
    for ax, values, label, lower in zip(fig.subplots(1, 2), (attack, capability), (attack_label, capability_label),
                                        (attack_lower_is_better, False)):
        grid = np.asarray(values, float).T[::-1]  # rows: s_B descending, columns: s_A
        im = ax.imshow(grid, cmap="viridis_r" if lower else "viridis", aspect="auto")
        best = (np.nanargmin if lower else np.nanargmax)(grid) if np.isfinite(grid).any() else -1
        for idx, v in enumerate(grid.ravel()):
            i, j = divmod(idx, grid.shape[1])
            r, g, b, _ = im.cmap(im.norm(v))
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
                    fontweight="bold" if idx == best else "normal")
        ax.set_xticks(range(len(s_a)), [f"{v:g}" for v in s_a])
        ax.set_yticks(range(len(s_b)), [f"{v:g}" for v in s_b[::-1]])
        ax.set(xlabel="s_A (LoRA A shrink)", ylabel="s_B (LoRA B shrink)", title=label)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_figure(fig, path)
