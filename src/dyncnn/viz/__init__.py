"""Plots (matplotlib, headless): training curves, accuracy by digit scale, accuracy against MACs, exit
histograms and easy/hard galleries."""
from .dynamic_plots import plot_accuracy_vs_macs, plot_easy_hard_gallery, plot_exit_histogram
from .plots import plot_accuracy_by_scale, plot_training_curves

__all__ = ["plot_training_curves", "plot_accuracy_by_scale", "plot_accuracy_vs_macs", "plot_exit_histogram",
           "plot_easy_hard_gallery"]
