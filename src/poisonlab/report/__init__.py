"""Reports: PNG plots written by every run, tables for the terminal."""

from poisonlab.report.plots import plot_confusion, plot_examples, plot_history

__all__ = ["plot_confusion", "plot_examples", "plot_history"]
