"""Reports: PNG plots written by every run (:mod:`~poisonlab.report.plots`), result tables
(:mod:`~poisonlab.report.tables`), the self-contained HTML report (:mod:`~poisonlab.report.html`).

``report`` imports nothing from ``experiments``: the experiment runner calls into it, never the
other way round. matplotlib is imported only when a plot is drawn.
"""

_PLOTS = ("plot_confusion", "plot_examples", "plot_history", "plot_feature_views", "plot_score_histogram")

__all__ = list(_PLOTS)


def __getattr__(name: str):
    if name in _PLOTS:
        from poisonlab.report import plots

        return getattr(plots, name)
    raise AttributeError(f"module 'poisonlab.report' has no attribute {name!r}")
