"""Reports: PNG plots written by every run, tables for the terminal."""

from poisonlab.report.plots import (plot_confusion, plot_examples, plot_feature_views, plot_history,
                                    plot_score_histogram)

__all__ = ["plot_confusion", "plot_examples", "plot_history", "plot_feature_views", "plot_score_histogram"]
