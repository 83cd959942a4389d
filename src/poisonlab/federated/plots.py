"""Clean accuracy and backdoor ASR over rounds, one line per aggregator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from poisonlab.report.plots import plt, save_figure


def plot_rounds(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> Path:
    """``rows``: per-round dicts with ``aggregator, round, clean_acc, asr`` (NaN ASR: no backdoor, panel left out)."""
    aggs = list(dict.fromkeys(r["aggregator"] for r in rows))
    has_asr = any(r["asr"] == r["asr"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_asr else 1, figsize=(10 if has_asr else 5.5, 3.4), squeeze=False)
    for a in aggs:
        rs = sorted((r for r in rows if r["aggregator"] == a), key=lambda r: r["round"])
        x = [r["round"] for r in rs]
        axes[0, 0].plot(x, [r["clean_acc"] for r in rs], marker=".", label=a)
        if has_asr:
            axes[0, 1].plot(x, [r["asr"] for r in rs], marker=".", label=a)
    axes[0, 0].set(xlabel="round", ylabel="global clean accuracy", ylim=(0, 1))
    if has_asr:
        axes[0, 1].set(xlabel="round", ylabel="backdoor ASR", ylim=(0, 1))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)
