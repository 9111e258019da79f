"""Plots (matplotlib, headless): training curves, accuracy by digit scale; accuracy-vs-MACs plots come with the
dynamic networks."""
from .plots import plot_accuracy_by_scale, plot_training_curves

__all__ = ["plot_training_curves", "plot_accuracy_by_scale"]
