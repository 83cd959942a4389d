"""Matplotlib figures written by every run (PNG, Agg backend: no display needed)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from poisonlab.utils import atomic_write_bytes  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG to ``path`` (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_history(history: Sequence[dict], path: str | os.PathLike[str], title: str = "") -> Path:
    """Loss and accuracy per epoch (train, and validation when present)."""
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.plot(ep, [h["loss"] for h in history], label="train")
    a2.plot(ep, [h["acc"] for h in history], label="train")
    if history and "val_loss" in history[0]:
        a1.plot(ep, [h["val_loss"] for h in history], label="validation")
        a2.plot(ep, [h["val_acc"] for h in history], label="validation")
    a1.set(xlabel="epoch", ylabel="loss")
    a2.set(xlabel="epoch", ylabel="accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike[str], title: str = "") -> Path:
    """Row-normalised confusion matrix with counts."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(0.45 * k + 1.8, 0.45 * k + 1.4))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)


def plot_examples(clean: np.ndarray, poisoned: np.ndarray, path: str | os.PathLike[str],
                  labels_before: Sequence[str] | None = None, labels_after: Sequence[str] | None = None,
                  title: str = "", n: int = 8) -> Path:
    """Clean vs poisoned images side by side, with the difference amplified to full range."""
    n = min(n, len(clean))
    fig, axes = plt.subplots(3, n, figsize=(1.4 * n, 4.6), squeeze=False)
    for i in range(n):
        c, p = clean[i].astype(np.float32) / 255, poisoned[i].astype(np.float32) / 255
        d = np.abs(p - c)
        d = d / d.max() if d.max() > 0 else d
        for row, img in enumerate((c, p, d)):
            ax = axes[row, i]
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if labels_before is not None:
            axes[0, i].set_title(str(labels_before[i]), fontsize=7)
        if labels_after is not None:
            axes[1, i].set_title(str(labels_after[i]), fontsize=7)
    for row, name in enumerate(("clean", "poisoned", "|diff| (amplified)")):
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_feature_views(views: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | os.PathLike[str],
                       title: str = "") -> Path:
    """Side-by-side 2-D scatter plots: each view is ``(title, xy (N, 2), is_poison (N,))``."""
    n = len(views)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, (name, xy, poison) in zip(axes[0], views):
        xy, poison = np.asarray(xy), np.asarray(poison, dtype=bool)
        ax.scatter(xy[~poison, 0], xy[~poison, 1], s=5, c="tab:blue", alpha=0.5, label=f"clean ({(~poison).sum()})")
        ax.scatter(xy[poison, 0], xy[poison, 1], s=9, c="tab:red", alpha=0.8, label=f"poisoned ({poison.sum()})")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_score_histogram(scores: np.ndarray, is_poison: np.ndarray, path: str | os.PathLike[str],
                         title: str = "") -> Path:
    """Histogram of a filter's suspicion scores, clean and poisoned samples separately."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64))
    p = np.asarray(is_poison, dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.histogram_bin_edges(s, bins=40) if np.ptp(s) > 0 else 10
    ax.hist(s[~p], bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({(~p).sum()})", density=True)
    if p.any():
        ax.hist(s[p], bins=bins, alpha=0.6, color="tab:red", label=f"poisoned ({p.sum()})", density=True)
    ax.set(xlabel="suspicion score (higher = more suspicious)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_per_class_accuracy(series: Sequence[tuple[str, Sequence[float]]], classes: Sequence[str],
                            path: str | os.PathLike[str], title: str = "", target: int | None = None) -> Path:
    """Grouped bars of per-class accuracy: ``series`` is ``[(label, accuracy per class (K,)), ...]`` (e.g. the
    clean baseline, the poisoned model, the defended one); ``target`` (the attack's target class, if any) is
    marked in red so its drop or rise against the others is visible. NaN (a class absent from the test set)
    draws no bar."""
    k, n = len(classes), max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(max(5.0, 0.22 * k * n + 1.8), 16), 3.2))
    width = 0.8 / n
    colors = ["#9e9e9e", "tab:red", "tab:blue", "tab:green", "tab:purple"]
    x = np.arange(k)
    for j, (label, acc) in enumerate(series):
        ax.bar(x + (j - (n - 1) / 2) * width, np.asarray(acc, dtype=np.float64), width, label=label,
               color=colors[j % len(colors)], alpha=0.85)
    names = [str(c)[:16] for c in classes]
    tilt = k > 12 or max(map(len, names), default=0) > 3  # short labels (digits) stay upright
    ax.set_xticks(x, names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    if target is not None and 0 <= target < k:
        tick = ax.get_xticklabels()[target]
        tick.set_color("tab:red")
        tick.set_fontweight("bold")
        ax.axvspan(target - 0.5, target + 0.5, color="tab:red", alpha=0.08, lw=0)
    ax.set(ylim=(0, 1.05), xlim=(-0.6, k - 0.4), ylabel="accuracy (clean test)",
           title=title + (f" (target: {classes[target]})" if target is not None and 0 <= target < k else ""))
    ax.title.set_fontsize(10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # outside: bars stay visible
    return save_figure(fig, path)


def plot_reversed_triggers(masks: np.ndarray, patterns: np.ndarray, classes: Sequence[str], l1: Sequence[float],
                           anomaly: Sequence[float], flagged: Sequence[int], path: str | os.PathLike[str],
                           title: str = "", per_row: int = 10) -> Path:
    """Neural Cleanse's reversed trigger of every class: the mask (grey, ``masks`` (K, H, W)) above
    mask x pattern (``patterns`` (K, H, W, C)); both uint8 (0-255 for [0, 1]) or float in [0, 1]. Each column
    is titled with the class, the mask's L1 norm and its anomaly index; ``flagged`` classes get a red title.
    More than ``per_row`` classes wrap onto further rows."""
    def unit(a: np.ndarray) -> np.ndarray:  # uint8 storage -> [0, 1]
        a = np.asarray(a)
        return a.astype(np.float32) / 255 if a.dtype.kind in "iu" else np.clip(a.astype(np.float32), 0, 1)

    m, pat = unit(masks), unit(patterns)
    k = len(m)
    cols = min(k, per_row)
    blocks = -(-k // cols)
    # constrained layout gives the three-line titles and the suptitle their room; one sub-figure per row of
    # classes keeps each mask right above its stamp
    fig = plt.figure(figsize=(1.3 * cols + 0.5, 3.1 * blocks + 0.4), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.02, w_pad=0.02, hspace=0.0, wspace=0.02)
    subs = np.atleast_1d(fig.subfigures(blocks, 1))
    bad = {int(c) for c in flagged}
    for b, sub in enumerate(subs):
        axes = sub.subplots(2, cols, squeeze=False)
        for a in axes.ravel():
            a.set_xticks([])
            a.set_yticks([])
            for sp in a.spines.values():
                sp.set_visible(False)
        axes[0, 0].set_ylabel("mask", fontsize=8)
        axes[1, 0].set_ylabel("mask x pattern", fontsize=8)
        for j in range(cols):
            i = b * cols + j
            if i >= k:
                axes[0, j].axis("off")
                axes[1, j].axis("off")
                continue
            axes[0, j].imshow(m[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            stamp = m[i][..., None] * pat[i]
            axes[1, j].imshow(stamp[..., 0] if stamp.shape[-1] == 1 else stamp,
                              cmap="gray" if stamp.shape[-1] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
            flag = i in bad
            axes[0, j].set_title(f"{str(classes[i])[:12]}{' (flagged)' if flag else ''}\nL1 {l1[i]:.1f}\n"
                                 f"anomaly {anomaly[i]:.2f}", fontsize=8, color="tab:red" if flag else "black",
                                 fontweight="bold" if flag else "normal")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_strip_entropy(ent_clean: np.ndarray, ent_trig: np.ndarray | None, threshold: float,
                       path: str | os.PathLike[str], title: str = "") -> Path:
    """STRIP's entropy histograms: clean test inputs against triggered ones (when there are), with the
    rejection threshold (inputs below it are rejected as triggered) as a vertical line."""
    c = np.nan_to_num(np.asarray(ent_clean, dtype=np.float64))
    t = None if ent_trig is None else np.nan_to_num(np.asarray(ent_trig, dtype=np.float64))
    both = c if t is None else np.r_[c, t]
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bins = np.histogram_bin_edges(np.r_[both, threshold], bins=40) if np.ptp(np.r_[both, threshold]) > 0 else 10
    ax.hist(c, bins=bins, alpha=0.6, color="tab:blue", label=f"clean ({len(c)})", density=True)
    if t is not None and len(t):
        ax.hist(t, bins=bins, alpha=0.6, color="tab:red", label=f"triggered ({len(t)})", density=True)
    ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="mean entropy of blended copies (nats; low = rejected)", ylabel="density", title=title)
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _label_params(label: str) -> tuple[str, dict[str, str]]:
    """``"badnets(rate=0.1,size=3)"`` -> ``("badnets", {"rate": "0.1", "size": "3"})`` (run labels)."""
    name, _, rest = str(label).partition("(")
    params = {}
    for part in rest.rstrip(")").split(","):
        k, eq, v = part.partition("=")
        if eq:
            params[k.strip()] = v.strip()
    return name, params


def _wrap_label(text: str, width: int = 22, lines: int = 3) -> str:
    """``text`` wrapped at ``width`` characters (breaking after commas), at most ``lines`` lines."""
    import textwrap

    parts = textwrap.wrap(str(text).replace(",", ", "), width) or [""]
    if len(parts) > lines:
        parts = parts[:lines]
        parts[-1] = parts[-1][: width - 1] + "\u2026"
    return "\n".join(p.replace(", ", ",") for p in parts)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and v == v


def grid_axes(summary: Sequence[dict]) -> list[tuple[str, str, list[tuple[float, dict]]]]:
    """The attack parameters a grid varies: ``(attack name, parameter, [(value, summary row), ...])`` for
    every numeric parameter that takes two or more values among otherwise equal undefended rows."""
    groups: dict[tuple, list[tuple[float, dict]]] = {}
    for s in summary:
        if s.get("defense") not in (None, "none") or s.get("attack") in (None, "none"):
            continue
        name, params = _label_params(s["attack"])
        for k, v in params.items():
            try:
                x = float(v)
            except ValueError:
                continue
            rest = tuple(sorted((a, b) for a, b in params.items() if a != k))
            key = (s.get("dataset"), s.get("model"), s.get("training"), name, k, rest)
            groups.setdefault(key, []).append((x, s))
    return [(key[3], key[4], sorted(pts, key=lambda p: p[0])) for key, pts in groups.items()
            if len({x for x, _ in pts}) >= 2]


def overview_png(summary: Sequence[dict]) -> bytes | None:
    """The report's overview as PNG bytes: clean accuracy vs ASR of every (attack, defence) (means with
    standard deviations over seeds), DER per defence, and ASR / clean accuracy against every attack
    parameter the grid varies. None when the rows hold nothing to plot (no attack was run)."""
    pts = [s for s in summary if _finite(s.get("clean_acc")) and _finite(s.get("asr"))]
    der: dict[str, list[float]] = {}
    for s in summary:
        if _finite(s.get("der")):
            der.setdefault(str(s.get("defense")), []).append(float(s["der"]))
    axes_ = grid_axes(summary)
    panels = bool(pts) + bool(der) + len(axes_)
    if not panels:
        return None
    fig, axs = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    axs = list(axs[0])
    if pts:
        ax = axs.pop(0)
        defences = sorted({str(s.get("defense")) for s in pts})
        markers = "osD^v<>pPX*h"
        for j, d in enumerate(defences):
            mine = [s for s in pts if str(s.get("defense")) == d]
            ax.errorbar([s["clean_acc"] for s in mine], [s["asr"] for s in mine],
                        xerr=[np.nan_to_num(s.get("clean_acc_std", 0.0)) for s in mine],
                        yerr=[np.nan_to_num(s.get("asr_std", 0.0)) for s in mine],
                        fmt=markers[j % len(markers)], ms=6, capsize=2, label=d, alpha=0.85)
        ax.set(xlabel="clean accuracy", ylabel="attack success rate", title="every attack and defence")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="defence", title_fontsize=8)
    if der:
        ax = axs.pop(0)
        names = sorted(der)
        ax.bar(range(len(names)), [float(np.mean(der[n])) for n in names],
               yerr=[float(np.std(der[n])) if len(der[n]) > 1 else 0.0 for n in names], capsize=3,
               color="tab:green", alpha=0.8)
        # whole labels, wrapped: "neural_cleanse(epochs=2," cut at 24 characters hid the settings
        ax.set_xticks(range(len(names)), [_wrap_label(n) for n in names], rotation=25, ha="right", fontsize=7)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(ylim=(0, 1), ylabel="DER (0.5: no effect)", title="defence effectiveness (mean over attacks)")
    for name, param, series in axes_:
        ax = axs.pop(0)
        x = [p[0] for p in series]
        for metric, color in (("asr", "tab:red"), ("clean_acc", "tab:blue")):
            y = [p[1].get(metric) for p in series]
            if all(_finite(v) for v in y):
                ax.errorbar(x, y, yerr=[np.nan_to_num(p[1].get(metric + "_std", 0.0)) for p in series],
                            marker="o", capsize=2, color=color, label=metric)
        ax.set(xlabel=f"{name}: {param}", ylim=(0, 1.02), title=f"{name} against {param} (no defence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
